"""The measuring behind `ofs-scale inspect` (its command line and what it reports:
eval/inspect_cli.py): a Hugging Face causal LM hooked by the training `Collector`.

Shapes: B windows, T tokens, D width, H heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ofs_scale.metrics.collect import ATTN, MLP, RESID, Collector, Site
from ofs_scale.parallel.mesh import Mesh

# module names, first match wins
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
DOWN_PROJS = ("mlp.down_proj", "mlp.c_proj", "fc2", "mlp.dense_4h_to_h", "mlp.fc_out", "mlp.fc2")
ATTENTIONS = ("self_attn", "attn", "attention", "self_attention")


def single_mesh(device: torch.device) -> Mesh:
    """A one-process mesh (no process group: the Collector needs none at size 1)."""
    return Mesh(
        world_size=1, rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
        tp_group=None, pp_group=None, dp_group=None, device=device, backend="none",
    )  # fmt: skip


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (as long as config.num_hidden_layers)."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no list of {n} decoder layers found in {type(model).__name__}")


def _find(
    root: nn.Module, names: tuple[str, ...], outside: nn.Module | None = None
) -> nn.Module | None:
    """The first submodule of `root` called one of `names` (in that order of preference),
    skipping those inside `outside`."""
    skip = {id(m) for m in outside.modules()} if outside is not None else set()
    modules = [(n, m) for n, m in root.named_modules() if id(m) not in skip]
    for name in names:
        for full, module in modules:
            if full == name or full.endswith("." + name):
                return module
    return None


def _tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


def _entropy(p_BHTT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of row entropies in nats, number of rows) of attention probabilities."""
    p = p_BHTT.detach().double()
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum()
    B, H, T, _ = p.shape
    return ent, torch.tensor(float(B * H * T), dtype=torch.float64)


def hf_taps(model: nn.Module) -> tuple[list[Site], list[tuple[Site, nn.Module, str]]]:
    """Sites of a Hugging Face causal LM and (site, module, how) to hook: `pre` reads the
    module's first input, `out` its output, `probs` the attention probabilities it returns."""
    layers = decoder_layers(model)
    n = len(layers)
    sites = [Site("embed", RESID)] + [Site(f"block_{i:02d}", RESID) for i in range(n)]
    taps = [(sites[0], layers[0], "pre")]
    taps += [(sites[i + 1], layer, "out") for i, layer in enumerate(layers)]
    final = _find(model, FINAL_NORMS, outside=layers)
    if final is not None:
        sites.append(Site("final", RESID))
        taps.append((sites[-1], final, "pre"))
    for kind, names, how in ((MLP, DOWN_PROJS, "pre"), (ATTN, ATTENTIONS, "probs")):
        for i, layer in enumerate(layers):
            module = _find(layer, names)
            if module is not None:
                site = Site(f"{kind}_{i:02d}", kind)
                sites.append(site)
                taps.append((site, module, how))
    return sites, taps


class HFCollector(Collector):
    """The training Collector, hooked onto a Hugging Face model instead of ofs_scale's taps."""

    def attach_hf(self, taps: list[tuple[Site, nn.Module, str]]) -> None:
        """Register one hook per (site, module, how) from `hf_taps`."""
        for site, module, how in taps:
            measure = self._hook(site)
            if how == "pre":

                def hook(m, args, kwargs, measure=measure):
                    x = args[0] if args else kwargs.get("hidden_states")
                    measure(m, args, x)

                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            elif how == "out":
                handle = module.register_forward_hook(
                    lambda m, a, out, measure=measure: measure(m, a, _tensor(out))
                )
            else:
                handle = module.register_forward_hook(self._probs_hook(site))
            self.hooked.append(site)
            self.handles.append(handle)

    def _probs_hook(self, site: Site):
        def hook(module, args, output) -> None:
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:  # not eager attention: nothing to measure
                return
            ent_sum, ent_n = _entropy(probs)
            self._add(site.name, {"ent_sum": ent_sum, "ent_n": ent_n})

        return hook


def text_windows(tokenizer: Any, text: str, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to `max_windows` consecutive windows of `seq_len` tokens of `text` (B, T)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    num = min(max_windows, len(ids) // seq_len)
    if num < 1:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one window of {seq_len}: "
            "give more text or a smaller --seq-len"
        )
    return torch.tensor(ids[: num * seq_len]).view(num, seq_len)


def measure(
    model: nn.Module, tokens_BT: torch.Tensor, batch_size: int = 4
) -> tuple[dict[str, float], list[Site]]:
    """OF metrics of `model` on the windows `tokens_BT`: the training record's keys
    (`of/kurtosis/block_03`, `of/mmr/mlp_01`, `attn/entropy/attn_00`, ...)."""
    sites, taps = hf_taps(model)
    device = next(model.parameters()).device
    collector = HFCollector(sites, single_mesh(device))
    collector.attach_hf(taps)
    try:
        with torch.no_grad():
            for chunk in tokens_BT.split(batch_size):
                model(chunk.to(device))
    finally:
        collector.detach()
    measured = {s.name for s in collector.hooked if s.name in collector.partials}
    collector.sites = [s for s in sites if s.name in measured]
    collector.hooked = [s for s in collector.hooked if s.name in measured]
    return collector.reduce(), collector.sites


def profile_plot(record: dict[str, float], sites: list[Site], path: Path) -> Path:
    """Kurtosis and MMR of the residual stream and MLP hidden against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, metric, label in zip(axes, ("of/kurtosis", "of/mmr"), ("kurtosis", "MMR")):
        for kind in (RESID, MLP):
            names = [s.name for s in sites if s.kind == kind]
            ax.plot(range(len(names)), [record[f"{metric}/{n}"] for n in names], "o-", label=kind)
        ax.set(title=label, xlabel="depth (site index)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def inspect_model(
    model_dir: str | Path,
    text_file: str | Path,
    out_dir: str | Path | None = None,
    seq_len: int = 512,
    max_windows: int = 8,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Load the model (eager attention, so probabilities are available), measure it on the
    text, write the outputs; returns `{"record", "sites", "out_dir", ...}`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ofs_scale.metrics.plots import write_plots

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="eager", trust_remote_code=True
    ).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    limit = getattr(model.config, "max_position_embeddings", None) or seq_len
    tokens = text_windows(tokenizer, Path(text_file).read_text(), min(seq_len, limit), max_windows)
    record, sites = measure(model, tokens, batch_size)
    out = Path(out_dir) if out_dir else Path(model_dir) / "ofs_inspect"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, **record}) + "\n")
    info = {
        "model": str(model_dir),
        "text": str(text_file),
        "windows": list(tokens.shape),
        "record": record,
    }
    (out / "inspect.json").write_text(json.dumps(info, indent=1) + "\n")
    plots = [*write_plots(out, out), profile_plot(record, sites, out / "profile.png")]
    return {**info, "sites": sites, "out_dir": out, "plots": plots}
