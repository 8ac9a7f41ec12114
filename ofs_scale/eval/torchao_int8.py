"""Real int8 inference with torchao, to check the simulated W8A8 evaluation against kernels.

The loaded run is exported (`ofs_scale.export`) into a temporary Hugging Face directory and
loaded back as a plain transformers model whose linear layers are `nn.Linear`; torchao's
`Int8DynamicActivationInt8WeightConfig` then replaces every weight (the head included) by an
int8 tensor with one symmetric scale per output channel, and rounds each activation row (token)
to int8 on the fly: the deployed counterpart of `ofs-scale quant --weights channel --acts
dynamic`. The validation loss is taken on exactly the windows `quant_eval` uses.

Two differences from the simulated protocol remain, by construction: torchao's activations are
symmetric int8 (-127..127, no zero point), ours asymmetric uint8 (256 levels over [min, max]);
and a tied head in the remote-code export computes with the embedding table directly, so torchao
leaves it in float.
"""

from __future__ import annotations

import math
import tempfile
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ofs_scale.data import collate, eval_micro_batches
from ofs_scale.export.convert import export_model

if TYPE_CHECKING:
    from ofs_scale.quant.evaluate import LoadedRun

ROW = "W8A8 torchao"
"""The row's name in the quantisation table."""


def _val_batches(run: LoadedRun, eval_batches: int) -> list[tuple[torch.Tensor, ...]]:
    cfg = run.cfg
    ids = eval_micro_batches(
        run.val_split.num_samples, eval_batches, cfg.train.global_batch, cfg.train.micro_batch,
        0, 1,
    )  # fmt: skip
    return [collate(run.val_split, i) for i in ids]


def hf_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> float:
    """Mean over micro batches of the mean next-token cross-entropy of a transformers model
    (logits beyond the real vocabulary, the padding, are kept as in training)."""
    total = 0.0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).logits.float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    return total / len(batches)


def torchao_int8_eval(run: LoadedRun, eval_batches: int | None = None) -> dict[str, Any]:
    """fp and torchao int8 (dynamic per-token activations, per-channel weights) validation loss
    and perplexity of the loaded run, single process, on the CPU."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from transformers import AutoModelForCausalLM

    if run.mesh.world_size != 1:
        raise ValueError("the torchao row runs in one process (drop torchrun / --tp)")
    eval_batches = eval_batches or run.cfg.train.eval_batches
    batches = [tuple(t.cpu() for t in b) for b in _val_batches(run, eval_batches)]
    model = run.engine.model
    with tempfile.TemporaryDirectory(prefix="ofs-torchao-") as tmp:
        export_model(model, tmp, None, run.cfg.data.seq_len)
        hf = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True, dtype=torch.float32)
    hf.eval()
    fp = hf_loss(hf, batches)
    quantize_(hf, Int8DynamicActivationInt8WeightConfig())
    int8 = hf_loss(hf, batches)
    return {
        "fp": {"val_loss": fp, "val_ppl": math.exp(min(fp, 50.0))},
        "int8": {"val_loss": int8, "val_ppl": math.exp(min(int8, 50.0))},
        "eval_batches": eval_batches,
        "torchao": __import__("torchao").__version__,
    }


def add_torchao_row(result: dict[str, Any], run: LoadedRun, eval_batches: int | None) -> None:
    """Add the `W8A8 torchao` row to a `quant_eval` result (increase over its fp row) and, under
    `torchao`, the export's own fp loss and the agreement with the simulated W8A8 row."""
    real = torchao_int8_eval(run, eval_batches)
    fp_ppl = result["results"]["fp"]["val_ppl"]
    row = dict(real["int8"])
    row["increase_pct"] = 100.0 * (row["val_ppl"] - fp_ppl) / fp_ppl
    result["results"][ROW] = row
    sim = result["results"]["W8A8"]["val_ppl"]
    real["vs_simulated_W8A8_pct"] = 100.0 * (row["val_ppl"] - sim) / sim
    real["export_fp_vs_fp_pct"] = 100.0 * (real["fp"]["val_ppl"] - fp_ppl) / fp_ppl
    result["torchao"] = real
