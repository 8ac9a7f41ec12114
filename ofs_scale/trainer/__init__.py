"""The training loop (`loop.Trainer`), the callback contract (`callbacks`), the built-in callbacks
(loggers, checkpoint schedule, preemption) and the `train` entry point (`main`)."""
