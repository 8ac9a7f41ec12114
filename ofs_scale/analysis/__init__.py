"""Offline analysis of runs: the sweep report (`report`), CMD analysis (`cmd`), the memory /
step-time planner (`plan`; its command and printed report in `plan_cli`) and plot redrawing
(`plot_cli`). Each command module's `main(argv)` is an `ofs-scale` subcommand."""
