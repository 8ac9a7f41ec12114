"""`ofs-scale prepare`: tokenize raw text into a megatron-core indexed dataset (offline).

ofs-scale prepare data/*.jsonl.zst more/ --out /data/mycorpus --workers 16
ofs-scale prepare shards/*.parquet --out /data/c2 --tokenizer llama/tokenizer.model
"""

from __future__ import annotations

import argparse

EPILOG = """Inputs: .jsonl, .jsonl.gz, .jsonl.zst (one JSON object per line, text under --text-key),
.parquet (column --text-key), a Hugging Face dataset directory written by save_to_disk, plain-text
files (one document each) and directories of any of these, globs, or 'stdlib' (this Python's
standard library). Output: OUT/part_NNNNN.bin/.idx (megatron-core's indexed dataset, one part per
input file, EOD after every document), OUT/tokenizer.model and OUT/manifest.json. Run the same
command again to resume an interrupted preparation: finished parts are kept."""


def build_parser() -> argparse.ArgumentParser:
    """The options of `ofs-scale prepare`."""
    p = argparse.ArgumentParser(
        prog="ofs-scale prepare",
        description="Tokenize raw text into a megatron-core indexed dataset, in parallel.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="input files, directories, globs, or 'stdlib'")
    p.add_argument("--out", required=True, help="output directory (created; resumed if present)")
    p.add_argument("--tokenizer", help="an existing sentencepiece .model to use (no training)")
    p.add_argument("--vocab-size", type=int, default=8192, help="pieces of the trained tokenizer")
    p.add_argument(
        "--sample-bytes",
        type=int,
        default=100_000_000,
        help="text sampled from the inputs to train the tokenizer (default 1e8)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (one part each)")
    p.add_argument("--text-key", default="text", help="JSON field / column holding the text")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer training")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `ofs-scale prepare`; a bad input prints one line naming it and returns 2."""
    args = build_parser().parse_args(argv)
    from ofs_scale.console import console
    from ofs_scale.data.prepare import DataError, prepare_dataset

    try:
        prepare_dataset(
            args.inputs,
            args.out,
            vocab_size=args.vocab_size,
            tokenizer_model=args.tokenizer,
            sample_bytes=args.sample_bytes,
            workers=max(args.workers, 1),
            text_key=args.text_key,
            seed=args.seed,
            progress=not args.quiet,
        )
    except DataError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: finished parts are kept; run the same command to resume")
        return 130
    return 0
