"""Export a run or checkpoint as a Hugging Face transformers model directory.

ofs-scale export RUN_DIR_OR_CKPT OUT_DIR [--arch auto|llama|ofs] [--config YAML] [key=value ...]

Writes config.json, model.safetensors and the tokenizer (tokenizer.json, loadable by
AutoTokenizer) into OUT_DIR. Pre-Norm + RMSNorm + SwiGLU + RoPE models without bias become a
stock Llama; every other configuration ships `modelling_ofs.py` and loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`. A checkpoint written
under any TP / PP / DP layout is resharded into one process first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ofs_scale.cli_args import RUN_PATH_HELP, add_run_config_args, command_parser

if TYPE_CHECKING:  # torch-importing modules wait until the arguments are parsed
    from ofs_scale.quant.evaluate import LoadedRun


def tokenizer_model(run: LoadedRun) -> Path | None:
    """The sentencepiece model of a loaded run: `data.tokenizer`, else the one its first
    dataset was prepared with."""
    if run.cfg.data.tokenizer:
        return Path(run.cfg.data.tokenizer)
    data = run.extra.get("data")
    if data is None or not getattr(data, "datasets", None):
        return None
    ds = data.datasets[0]
    return Path(ds.path) / ds.tokenizer.get("model", "tokenizer.model")


def export_run(
    path: str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    overrides: list[str] = (),
    arch: str = "auto",
) -> dict:
    """Load `path` (a run directory's newest checkpoint, or one checkpoint) into one process and
    export it to `out_dir`; returns what was written (also saved as `ofs_export.json`)."""
    from ofs_scale.export.convert import export_model
    from ofs_scale.parallel.mesh import destroy_mesh
    from ofs_scale.quant.evaluate import load_run, resolve

    run = load_run(resolve(path, config), list(overrides))
    try:
        model = run.engine.model.eval()
        tok = tokenizer_model(run)
        written = export_model(model, out_dir, tok, run.cfg.data.seq_len, arch)
    finally:
        destroy_mesh()
    info = {
        "arch": written,
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "tokenizer": str(tok) if tok else None,
        "vocab_size_padded": model.vocab_size,
        "trust_remote_code": written == "ofs",
    }
    (Path(out_dir) / "ofs_export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = command_parser("export", __doc__)
    p.add_argument("path", help=RUN_PATH_HELP)
    p.add_argument("out", help="directory to write the Hugging Face model into")
    p.add_argument(
        "--arch",
        choices=["auto", "llama", "ofs"],
        default="auto",
        help="auto: Llama where it is exact, else the remote-code model; ofs: always the latter",
    )
    add_run_config_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ofs-scale export`."""
    args = build_parser().parse_args(argv)
    from ofs_scale.checkpoint import CheckpointError
    from ofs_scale.config import ConfigError
    from ofs_scale.data import DataError

    try:
        info = export_run(args.path, args.out, args.config, args.overrides, args.arch)
    except (ConfigError, CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    remote = ", trust_remote_code=True" if info["trust_remote_code"] else ""
    print(f"exported step {info['step']} of {info['checkpoint']} as {info['arch']} to {args.out}")
    print(f"load: AutoModelForCausalLM.from_pretrained({str(args.out)!r}{remote})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
