"""Offline preparation: raw text -> sentencepiece tokenizer -> megatron-core indexed dataset.

`prepare_dataset(inputs, out_dir)` lists the input files, groups them into parts (one per jsonl /
parquet / arrow file, plain-text files batched), trains a tokenizer on a bounded sample or uses a
given one, and tokenizes the parts in worker processes, streaming, into `part_NNNNN.bin/.idx`.
The manifest (`manifest.json`, rewritten atomically as parts finish) lists the tokenizer, the
finished parts and their counts: running the same preparation again skips finished parts, and
returns at once when the dataset is complete. Parts are independent and written in index order
into the manifest, so the output bytes do not depend on the number of workers or on
interruptions.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from ofs_scale.console import console
from ofs_scale.data.corpus import DataError
from ofs_scale.data.prepare.run import print_summary, run_parts
from ofs_scale.data.prepare.sources import Source, list_sources, plan_parts
from ofs_scale.data.prepare.tokenizer import (
    load_tokenizer,
    sample_lines,
    sha256_file,
    tokenizer_entry,
    train_tokenizer,
    write_atomic,
)
from ofs_scale.data.prepare.writer import (
    FORMAT,
    build_manifest,
    part_files_exist,
    part_prefix,
    read_manifest,
    token_dtype,
    write_manifest,
)

__all__ = ["DataError", "prepare_dataset", "read_manifest"]

TOKENIZER_FILE = "tokenizer.model"


def _command_line(inputs, out_dir, vocab_size, tokenizer_model, sample_bytes, text_key, seed):
    # The number of workers is left out: it does not change a byte of the output.
    args = [*inputs, "--out", str(out_dir)]
    if tokenizer_model:
        args += ["--tokenizer", str(tokenizer_model)]
    else:
        args += ["--vocab-size", str(vocab_size), "--sample-bytes", str(sample_bytes)]
    args += ["--text-key", text_key, "--seed", str(seed)]
    return "ofs-scale prepare " + shlex.join(args)


def _load_existing(out_dir: Path, sources: list[Source], vocab_size, tokenizer_model) -> dict:
    """The manifest already in `out_dir`, checked to belong to this preparation."""
    try:
        manifest = read_manifest(out_dir)
    except ValueError as e:
        raise DataError(
            f"{out_dir}/manifest.json is not valid JSON ({e}); delete {out_dir} and prepare again"
        ) from e
    if manifest is None:
        leftovers = [
            p.name
            for p in out_dir.iterdir()
            if not (p.name.startswith((".", "part_")) or p.name == TOKENIZER_FILE)
        ]
        if leftovers:
            raise DataError(
                f"output directory {out_dir} holds other files ({', '.join(sorted(leftovers)[:3])}"
                "...) and no manifest.json; give an empty or new directory"
            )
        return {}
    tok = manifest.get("tokenizer", {})
    if manifest.get("format") != FORMAT:
        raise DataError(f"{out_dir} holds a dataset of format {manifest.get('format')!r}, not ours")
    if tokenizer_model and sha256_file(tokenizer_model) != tok.get("sha256"):
        raise DataError(
            f"{out_dir} was prepared with another tokenizer than {tokenizer_model}; "
            "give a new output directory, or delete this one to prepare it again"
        )
    if not tokenizer_model and tok.get("vocab_size") != vocab_size:
        raise DataError(
            f"{out_dir} was prepared with a {tok.get('vocab_size')}-piece vocabulary, not "
            f"{vocab_size}; give a new output directory or --vocab-size {tok.get('vocab_size')}"
        )
    if manifest.get("sources") != [s.path for s in sources]:
        raise DataError(
            f"{out_dir} was prepared from other input files ({len(manifest.get('sources', []))} "
            f"files, now {len(sources)}); give a new output directory for these inputs"
        )
    return manifest


def _tokenizer(out_dir, existing, parts, vocab_size, tokenizer_model, sample_bytes, key, seed):
    model_path = out_dir / TOKENIZER_FILE
    if existing:
        if sha256_file(model_path) != existing["tokenizer"]["sha256"]:
            raise DataError(f"{model_path} differs from the manifest's; delete {out_dir} and redo")
        return load_tokenizer(model_path), model_path
    if tokenizer_model:
        load_tokenizer(tokenizer_model)  # refuses a model that cannot be used
        write_atomic(model_path, Path(tokenizer_model).read_bytes())
        return load_tokenizer(model_path), model_path
    lines = sample_lines(parts, sample_bytes, key)
    return train_tokenizer(lines, vocab_size, model_path, seed), model_path


def _nothing_usable(parts: list[dict]) -> None:
    skipped, empty = sum(p["skipped"] for p in parts), sum(p.get("empty", 0) for p in parts)
    first = [r for p in parts for r in p.get("bad_records", [])][:3]
    raise DataError(
        f"the inputs hold no usable document ({skipped} malformed, {empty} empty"
        + (f"; first: {'; '.join(first)}" if first else "")
        + "); check the files and --text-key"
    )


def prepare_dataset(
    inputs: list[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 8192,
    tokenizer_model: str | Path | None = None,
    sample_bytes: int = 100_000_000,
    workers: int = 1,
    text_key: str = "text",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Prepare (or finish preparing) the dataset of `inputs` in `out_dir`; returns its manifest.

    `inputs` are files, directories, globs or "stdlib"; `tokenizer_model` an existing
    sentencepiece model, else one of `vocab_size` pieces is trained on about `sample_bytes` of
    the input. A bad input stops with `DataError` naming it; finished parts are kept.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser().absolute()
    sources = list_sources(list(inputs))
    plan = plan_parts(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = _load_existing(out_dir, sources, vocab_size, tokenizer_model)
    if existing.get("complete") and all(
        part_files_exist(out_dir, p["prefix"]) for p in existing["parts"]
    ):
        if progress:
            n, t = len(existing["parts"]), existing["tokens"]
            console.print(f"{out_dir} is already prepared: {n} parts, {t:,} tokens")
        return existing
    sp, model_path = _tokenizer(
        out_dir, existing, plan, vocab_size, tokenizer_model, sample_bytes, text_key, seed
    )
    tok = tokenizer_entry(sp, model_path)
    dtype = token_dtype(tok["vocab_size"]).__name__
    created_by = _command_line(
        inputs, out_dir, vocab_size, tokenizer_model, sample_bytes, text_key, seed
    )
    planned = {part_prefix(i): [s.path for s in part] for i, part in enumerate(plan)}
    done = {
        p["prefix"]: p
        for p in existing.get("parts", [])
        if planned.get(p["prefix"]) == p["sources"] and part_files_exist(out_dir, p["prefix"])
    }

    def save(complete: bool = False) -> dict:
        manifest = build_manifest(
            tok, dtype, list(done.values()), [s.path for s in sources], created_by, complete
        )
        write_manifest(out_dir, manifest)
        return manifest

    save()
    todo = [(i, part) for i, part in enumerate(plan) if part_prefix(i) not in done]

    def finished(entry: dict) -> None:
        done[entry["prefix"]] = entry
        save()

    run_parts(out_dir, model_path, todo, text_key, workers, progress, finished)
    for stale in out_dir.glob(".*.tmp*"):  # left by an interrupted run, redone since
        stale.unlink(missing_ok=True)
    if not any(p["documents"] for p in done.values()):
        _nothing_usable(list(done.values()))
    manifest = save(complete=True)
    if progress:
        print_summary(manifest, out_dir, len(plan) - len(todo), time.perf_counter() - started)
    return manifest
