"""int8 post-training quantisation evaluation (simulated: quantise-dequantise in float).

`ofs-scale quant RUN_DIR_OR_CKPT` measures fp / W8 / A8 / W8A8 validation perplexity;
see docs/quantisation.md. Modules: `fake` (int8 round trips), `spec` (QuantSpec), `sim` (hooks
and weight swaps on a model, calibration), `evaluate` (load a run, measure), `table` (output),
`hook` (the launcher's post-run hook). Nothing is imported here, so the light modules (`spec`,
`table`, `hook`) load without torch or megatron-core.
"""
