"""lm-evaluation-harness (`ofs-scale eval`), torchao int8 rows, `ofs-scale inspect`."""
