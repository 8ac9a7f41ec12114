"""The test suite's multi-process harness (shared with benchmarks): see ofs_scale.parallel.spawn."""

from ofs_scale.testing.distributed import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
