"""PNG plots of a run's metrics.jsonl: kurtosis per layer (log scale), MMR, signal propagation
and attention entropy, the loss curve (with the CMD reconstruction's validation loss), and the
training-dynamics instruments (collapse, batchless aux loss, CMD error) when a run logs them.
Used at the end of training and by `ofs-scale plot RUN_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from ofs_scale.metrics.records import finite_number, load_records

Series = dict[str, tuple[list[int], list[float]]]


def series(records: list[dict[str, Any]], prefix: str) -> Series:
    """{site: (steps, values)} for every key `prefix/<site>`, sites in first-seen order; a step
    logged twice (a resumed run redoing work) keeps its last value."""
    by_site: dict[str, dict[int, float]] = {}
    for rec in records:
        for key, value in rec.items():
            if not key.startswith(prefix + "/"):
                continue
            x = finite_number(value)
            if x is not None:
                by_site.setdefault(key[len(prefix) + 1 :], {})[int(rec["step"])] = x
    return {site: (sorted(d), [d[s] for s in sorted(d)]) for site, d in by_site.items()}


def _is_resid(site: str) -> bool:
    return site in ("embed", "final") or site.startswith("block_")


def _panel(ax, data: Series, title: str, ylabel: str, log: bool) -> None:
    cmap = plt.get_cmap("viridis")
    for i, (site, (steps, values)) in enumerate(data.items()):
        ax.plot(steps, values, label=site, color=cmap(i / max(1, len(data) - 1)), marker=".")
    positive = [v for _, vs in data.values() for v in vs if v > 0]
    if log and positive:
        ax.set_yscale("log")
        # plain numbers (1.5, 2, 10) instead of 1.5x10^0; minor labels only within one decade
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        wide = max(positive) / min(positive) > 10
        ax.yaxis.set_minor_formatter(NullFormatter() if wide else plain)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if data:
        ax.legend(fontsize="x-small", ncol=2 if len(data) > 8 else 1)


def _two_panels(
    records: list[dict[str, Any]], prefix: str, ylabel: str, log: bool, path: Path
) -> Path | None:
    data = series(records, prefix)
    if not data:
        return None
    resid = {k: v for k, v in data.items() if _is_resid(k)}
    other = {k: v for k, v in data.items() if not _is_resid(k)}
    panels = [(resid, "residual stream"), (other, "MLP hidden")]
    panels = [(d, t) for d, t in panels if d]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (d, t) in zip(axes[0], panels, strict=True):
        _panel(ax, d, f"{ylabel}: {t}", ylabel, log)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(panels: list[tuple[Series, str, str, bool]], path: Path) -> Path | None:
    """One row of (data, title, ylabel, log) panels, those with data; None when none has."""
    panels = [p for p in panels if p[0]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (d, title, ylabel, log) in zip(axes[0], panels, strict=True):
        _panel(ax, d, title, ylabel, log)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sigprop(records: list[dict[str, Any]], path: Path) -> Path | None:
    cos, ent = series(records, "sigprop/cos"), series(records, "attn/entropy")
    return _panels(
        [
            (cos, "signal propagation: mean cosine between tokens", "cosine", False),
            (ent, "attention entropy (heads averaged)", "nats", False),
        ],
        path,
    )


def _instruments(records: list[dict[str, Any]], path: Path) -> Path | None:
    return _panels(
        [
            (series(records, "collapse/dead_frac"), "dead MLP units", "fraction", False),
            (series(records, "collapse/gamma_small_frac"), "norm gains near 0", "fraction", False),
            (series(records, "bln"), "batchless norm auxiliary loss", "loss", False),
            (series(records, "cmd"), "CMD reconstruction of the weights", "relative error", True),
        ],
        path,
    )


def _curve(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, finite values) of a top-level key; a step logged twice keeps its last value."""
    by_step: dict[int, float | None] = {
        int(r["step"]): finite_number(r[key]) for r in records if key in r
    }
    steps = sorted(s for s, v in by_step.items() if v is not None)
    return steps, [by_step[s] for s in steps]


def _loss(records: list[dict[str, Any]], path: Path) -> Path | None:
    train, val, cmd = (_curve(records, k) for k in ("loss", "val_loss", "val_loss_cmd"))
    if not train[0] and not val[0]:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    styles = [
        ("-", "train loss"),
        ("o-", "val loss"),
        ("s--", "val loss, CMD-reconstructed weights"),
    ]
    for (steps, values), (style, label) in zip((train, val, cmd), styles, strict=True):
        if steps:
            ax.plot(steps, values, style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write kurtosis.png, mmr.png, sigprop.png, loss.png and instruments.png for the run in
    `run_dir` (those with data) into `out_dir` (default `<run_dir>/plots`); return their
    paths."""
    run_dir = Path(run_dir)
    jsonl = run_dir / "metrics.jsonl"
    if not jsonl.is_file():
        raise FileNotFoundError(
            f"{jsonl} does not exist; pass the run.out_dir of a run that has logged steps"
        )
    records = load_records(jsonl)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _two_panels(records, "of/kurtosis", "kurtosis", True, out_dir / "kurtosis.png"),
        _two_panels(records, "of/mmr", "MMR", True, out_dir / "mmr.png"),
        _sigprop(records, out_dir / "sigprop.png"),
        _loss(records, out_dir / "loss.png"),
        _instruments(records, out_dir / "instruments.png"),
    ]
    return [p for p in written if p is not None]
