"""Run the parts of a preparation, in this process or in worker processes, with a progress bar
(parts, documents/s, tokens/s) and the summary at the end.

Workers are spawned (not forked: the caller may hold torch's threads) and each loads the
tokenizer once. They report documents and tokens through a queue as they write, and hand back
each finished part's manifest entry; the caller records it in the manifest at once. A worker
error (a file that cannot be read) stops the preparation with that error; a worker that dies
stops it with a message; finished parts stay recorded either way.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ofs_scale.console import console
from ofs_scale.data.corpus import DataError
from ofs_scale.data.prepare.sources import Source
from ofs_scale.data.prepare.writer import MAX_BAD_RECORDS, write_part

_WORKER: dict = {}


def _init_worker(model_path: str, reports) -> None:
    import sentencepiece as spm

    _WORKER["sp"] = spm.SentencePieceProcessor(model_file=model_path)
    _WORKER["reports"] = reports


def _work(out_dir: str, index: int, sources: list[Source], text_key: str) -> dict:
    reports = _WORKER["reports"]
    return write_part(
        Path(out_dir), index, sources, _WORKER["sp"], text_key, lambda d, t: reports.put((d, t))
    )


class _Bar:
    """Parts done of all, with document and token rates since the start."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.docs = self.tokens = 0
        self.start = time.perf_counter()
        self.progress = Progress(
            TextColumn("prepare"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("parts  {task.fields[rates]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("prepare", total=total, rates="")

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        secs = max(time.perf_counter() - self.start, 1e-9)
        rates = f"{self.docs / secs:,.0f} docs/s  {self.tokens / secs:,.0f} tokens/s"
        self.progress.update(self.task, rates=rates)

    def part_done(self) -> None:
        self.progress.advance(self.task)


def _in_workers(out_dir, model_path, todo, text_key, workers, bar, finished) -> None:
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    init = {"initializer": _init_worker, "initargs": (str(model_path), reports)}
    with ProcessPoolExecutor(workers, mp_context=ctx, **init) as ex:
        pending = {ex.submit(_work, str(out_dir), i, part, text_key) for i, part in todo}
        try:
            while pending:
                finished_now, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(reports, bar)
                for future in finished_now:
                    finished(future.result())
                    bar.part_done()
        except BrokenProcessPool as e:
            raise DataError(
                "a preparation worker died (killed, or out of memory); the finished parts are "
                "kept: run the same command again to resume, with fewer --workers if memory ran out"
            ) from e
        except BaseException:
            # Do not wait for the other parts in flight: they are redone on resume.
            for process in list(getattr(ex, "_processes", {}).values()):
                process.terminate()
            ex.shutdown(wait=False, cancel_futures=True)
            raise
    _drain(reports, bar)


def _drain(reports, bar: _Bar) -> None:
    while True:
        try:
            bar.add(*reports.get_nowait())
        except queue_mod.Empty:
            return


def run_parts(
    out_dir: Path,
    model_path: Path,
    todo: list[tuple[int, list[Source]]],
    text_key: str,
    workers: int,
    progress: bool,
    finished: Callable[[dict], None],
) -> None:
    """Write every part of `todo` ((index, sources) pairs); `finished(entry)` as each one ends."""
    if not todo:
        return
    bar = _Bar(len(todo), progress)
    with bar.progress:
        if workers > 1 and len(todo) > 1:
            workers = min(workers, len(todo))
            _in_workers(out_dir, model_path, todo, text_key, workers, bar, finished)
            return
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_path))
        for index, part in todo:
            finished(write_part(out_dir, index, part, sp, text_key, bar.add))
            bar.part_done()


def print_summary(manifest: dict, out_dir: Path, reused: int, seconds: float) -> None:
    """The preparation's totals, then the first malformed records with their file and line."""
    parts, tok = manifest["parts"], manifest["tokenizer"]
    new_tokens = sum(p["tokens"] for p in parts) if not reused else None
    table = Table(title=f"prepared {out_dir}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = {
        "parts": f"{len(parts)} ({reused} already done)" if reused else str(len(parts)),
        "documents": f"{manifest['documents']:,}",
        "tokens": f"{manifest['tokens']:,}",
        "malformed records skipped": f"{sum(p['skipped'] for p in parts):,}",
        "empty documents skipped": f"{sum(p.get('empty', 0) for p in parts):,}",
        "tokenizer": f"{tok['vocab_size']} pieces, end of document {tok['eod_id']}",
        "time": f"{seconds:.1f} s",
    }
    if new_tokens is not None:
        rows["tokens/s"] = f"{new_tokens / max(seconds, 1e-9):,.0f}"
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
    bad = [p for p in parts if p["skipped"]]
    for p in bad[:MAX_BAD_RECORDS]:
        first = "; ".join(p.get("bad_records", [])[:3])
        console.print(f"skipped {p['skipped']} malformed record(s) in {p['prefix']}: {first}")
    if len(bad) > MAX_BAD_RECORDS:
        console.print(f"... and in {len(bad) - MAX_BAD_RECORDS} more parts (see manifest.json)")
