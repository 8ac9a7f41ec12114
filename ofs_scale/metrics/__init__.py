"""Outlier-feature metrics: formulas (`stats`), hooks and exact distributed reductions
(`collect`), the Trainer callback (`callback`) and plots (`plots`)."""

from ofs_scale.metrics.collect import Collector, Site, all_sites, select_sites

__all__ = ["Collector", "Site", "all_sites", "select_sites"]
