"""Test support shipped with the package: the multi-process harness (`distributed`)."""
