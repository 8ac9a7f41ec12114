"""Outlier-feature metrics of any local Hugging Face causal LM on a text file.

ofs-scale inspect HF_MODEL_DIR TEXT_FILE [--seq-len 512] [--max-windows 8] [--batch-size 4]
    [--out DIR] [--device cpu] [--dtype float32]

The text is tokenized (no special tokens) into windows of `--seq-len` tokens and run through the
model once. The same `Collector` that measures training runs hooks the model: the residual
stream entering the first decoder layer (`embed`), after every decoder layer (`block_NN`) and
entering the final norm (`final`), the MLP hidden activation entering each down projection
(`mlp_NN`), and, with eager attention, the attention probabilities (`attn_NN`, entropy). Layers
and modules are found by the names GPT-2, OPT, Llama, Mistral, Qwen, GPT-NeoX and similar use.
Writes `metrics.jsonl` (one record, step 0), `inspect.json`, the training plots and
`profile.png` (metrics against depth) into `--out` (default `<model>/ofs_inspect`), and prints
the training's per-layer table.

The measuring (eval/inspect_hf.py: torch, transformers) is imported after the arguments are
parsed, so `--help` answers at once.
"""

from __future__ import annotations

import sys

from ofs_scale.cli_args import command_parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ofs-scale inspect`."""
    p = command_parser("inspect", __doc__)
    p.add_argument("model", help="a local Hugging Face causal LM directory")
    p.add_argument("text", help="a UTF-8 text file")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", help="output directory (default: <model>/ofs_inspect)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = p.parse_args(argv)
    from ofs_scale.console import console
    from ofs_scale.eval.inspect_hf import inspect_model
    from ofs_scale.instruments.of_metrics import MetricsCallback

    try:
        got = inspect_model(
            args.model, args.text, args.out, args.seq_len, args.max_windows,
            args.batch_size, args.device, args.dtype,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    view = MetricsCallback(plots=False)
    view.sites, view.last = got["sites"], got["record"]
    table = view.table()
    table.title = f"outlier features of {args.model} ({got['windows'][0]} x {got['windows'][1]})"
    console.print(table)
    console.print(f"wrote {got['out_dir']}/inspect.json, metrics.jsonl and plots", soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
