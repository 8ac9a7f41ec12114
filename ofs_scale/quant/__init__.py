"""int8 post-training quantisation evaluation (simulated: quantise-dequantise in float).

`python -m ofs_scale.quant RUN_DIR_OR_CKPT` measures fp / W8 / A8 / W8A8 validation perplexity;
see docs/quantisation.md.
"""

from ofs_scale.quant.evaluate import load_run, quant_eval, resolve
from ofs_scale.quant.fake import fake_quant_asym, fake_quant_dynamic, fake_quant_weight
from ofs_scale.quant.sim import QuantSpec, calibrate, fake_quantized, find_sites

__all__ = [
    "QuantSpec",
    "calibrate",
    "fake_quant_asym",
    "fake_quant_dynamic",
    "fake_quant_weight",
    "fake_quantized",
    "find_sites",
    "load_run",
    "quant_eval",
    "resolve",
]
