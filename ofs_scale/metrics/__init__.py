"""Outlier-feature metrics: formulas (`stats`), hooks and exact distributed reductions
(`collect`), the Trainer callback (`callback`) and plots (`plots`)."""

# Nothing is imported here: `records` and `plots` load without torch (the report and plot
# commands), `collect` and `stats` with it.
