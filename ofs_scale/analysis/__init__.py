"""Offline analysis of runs: the sweep report, CMD analysis and the memory / step-time planner."""
