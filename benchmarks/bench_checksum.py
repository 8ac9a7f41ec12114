"""Checkpoint checksums: what the crc32 of every saved file adds to a save and to a resume.

The smoke model (configs/smoke.yaml shapes unless overridden) with its AdamW state after one
step is saved `--rounds` times; each round times the whole save (DCP write, crc32, metadata,
rename), the crc32 pass alone on the committed files, and the verification before a load:

    ckpt_mb=...  save_ms=...  crc_ms=...  crc_share_of_save=...  verify_ms=...  crc_gb_per_s=...

    python benchmarks/bench_checksum.py [--rounds 5] [--threads N] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import parse, smoke_config

from ofs_scale.checkpoint.integrity import checksums, saved_files
from ofs_scale.trainer.loop import Trainer


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result line and return the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_checksum.py")
    parser.add_argument("--rounds", type=int, default=5, help="saves to time")
    args = parse(parser, argv)
    trainer = Trainer(smoke_config(1, *args.overrides), callbacks=[])
    trainer.train_step()  # optimizer state exists, as in any real checkpoint
    save, crc, verify = [], [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        path = trainer.save_checkpoint(f"step_{r:06d}")
        save.append(time.perf_counter() - t0)
        files = saved_files(path)
        t0 = time.perf_counter()
        checksums(path, files)
        crc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert trainer.ckpt.checksum_problem(path) is None
        verify.append(time.perf_counter() - t0)
    size = sum((path / f).stat().st_size for f in files)
    out = {
        "ckpt_mb": size / 2**20,
        "save_ms": 1e3 * statistics.median(save),
        "crc_ms": 1e3 * statistics.median(crc),
        "verify_ms": 1e3 * statistics.median(verify),
    }
    out["crc_share_of_save"] = out["crc_ms"] / out["save_ms"]
    out["crc_gb_per_s"] = size / 1e9 / (out["crc_ms"] / 1e3)
    print("  ".join(f"{k}={v:.3g}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
