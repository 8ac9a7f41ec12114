"""Trainer data start-up: time and resident memory from config to the first batch in hand, on a
prepared dataset of ~1 billion tokens vs one of ~10 million (targets: both ratios <= 1.2).

Both datasets are written synthetically in megatron-core's indexed format (random uint16 tokens,
documents of 200-3000 tokens each ending in EOD; the .bin in big numpy chunks, the .idx header and
arrays directly) with a manifest, under a temporary directory that is deleted afterwards. Each
measurement runs in a fresh interpreter: load the config, open the dataset (`open_data`: manifest,
.idx headers, memory maps, train/val split), build the sampler and collate global batch 0
(512 x 2049 tokens, the 7B configs' shape). Sizes alternate over `--rounds`; medians are printed:

    small_tokens=...  large_tokens=...
    startup_ms_small=...  startup_ms_large=...  startup_ratio=<large/small>
    rss_mb_small=...  rss_mb_large=...  rss_ratio=<large/small>   (whole process, after batch 0)
    rss_growth_mb_small=...  rss_growth_mb_large=...   (over the process after its imports)

    python benchmarks/bench_startup.py [--large-tokens 1e9] [--small-tokens 1e7] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VOCAB = 32000
CHUNK = 1 << 26  # tokens generated and written per numpy call

MEASURE = """
import json, sys, time
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from ofs_scale.config import load_config
from ofs_scale.data import BatchSampler, collate, open_data
import megatron.core.datasets.indexed_dataset  # imported by open_data: not part of the timing
base = rss_mb()
t0 = time.perf_counter()
cfg = load_config(None, sys.argv[1:])
data = open_data(cfg.data, rank=0, seed=cfg.run.seed, progress=False)
t = cfg.train
sampler = BatchSampler(t.global_batch, t.micro_batch, 0, 1, data.train.key)
batches = [collate(data.train, ids) for ids in sampler.next()]
elapsed = time.perf_counter() - t0
assert sum(len(x) for x, _ in batches) == t.global_batch
print(json.dumps({"ms": 1000 * elapsed, "rss": rss_mb(), "growth": rss_mb() - base}))
"""


def write_dataset(root: Path, num_tokens: int, seed: int) -> int:
    """A prepared dataset of about `num_tokens` random tokens; returns the exact count."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(200, 3000, size=num_tokens // 1600 + 1).astype(np.int32)
    lengths = lengths[np.cumsum(lengths) <= num_tokens]
    total = int(lengths.sum())
    ends = np.cumsum(lengths.astype(np.int64))
    with open(root / "part_00000.bin", "wb") as f:
        for start in range(0, total, CHUNK):
            tokens = rng.integers(2, VOCAB, size=min(CHUNK, total - start), dtype=np.uint16)
            last = ends[(ends > start) & (ends <= start + len(tokens))] - 1  # EOD positions
            tokens[last - start] = 1
            tokens.tofile(f)
    pointers = np.concatenate([[0], ends[:-1]]) * 2
    with open(root / "part_00000.idx", "wb") as f:  # megatron-core's index layout, version 1
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))  # 8: uint16
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes())
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
    model = b"synthetic tokenizer"
    (root / "tokenizer.model").write_bytes(model)
    tok = {"kind": "sentencepiece", "model": "tokenizer.model", "vocab_size": VOCAB, "eod_id": 1}
    tok["sha256"] = hashlib.sha256(model).hexdigest()
    part = {"prefix": "part_00000", "sources": [], "documents": len(lengths), "tokens": total}
    manifest = {"format": "ofs_scale-indexed-v1", "tokenizer": tok, "dtype": "uint16"}
    manifest.update(parts=[part], documents=len(lengths), tokens=total, sources=[])
    (root / "manifest.json").write_text(json.dumps({**manifest, "created_by": __file__}))
    return total


def measure(path: Path) -> dict[str, float]:
    """Start-up of one fresh interpreter on the dataset at `path`."""
    over = [
        f"data.datasets=[{{path: {path}}}]",
        f"data.vocab_size={VOCAB}",
        "data.seq_len=2048",
        "train.global_batch=512",
        "train.micro_batch=1",
    ]
    cmd = [sys.executable, "-W", "ignore", "-c", MEASURE, *over]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Write both datasets, measure, print the result lines, delete them; returns the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_startup.py")
    parser.add_argument("--large-tokens", type=float, default=1.0e9)
    parser.add_argument("--small-tokens", type=float, default=1.0e7)
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each size")
    parser.add_argument("--dir", default=None, help="where to write the datasets (default: tmp)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_startup_", dir=args.dir))
    try:
        sizes = {
            "small": write_dataset(root / "small", int(args.small_tokens), 0),
            "large": write_dataset(root / "large", int(args.large_tokens), 1),
        }
        runs: dict[str, list[dict]] = {"small": [], "large": []}
        for _ in range(args.rounds):
            for name in runs:
                runs[name].append(measure(root / name))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {
        f"{key}_{name}": statistics.median(r[key] for r in rs)
        for name, rs in runs.items()
        for key in ("ms", "rss", "growth")
    }
    out = {
        "startup_ratio": med["ms_large"] / med["ms_small"],
        "rss_ratio": med["rss_large"] / med["rss_small"],
    }
    print(f"small_tokens={sizes['small']:,}  large_tokens={sizes['large']:,}")
    print(
        f"startup_ms_small={med['ms_small']:.1f}  startup_ms_large={med['ms_large']:.1f}  "
        f"startup_ratio={out['startup_ratio']:.2f}"
    )
    print(
        f"rss_mb_small={med['rss_small']:.1f}  rss_mb_large={med['rss_large']:.1f}  "
        f"rss_ratio={out['rss_ratio']:.2f}"
    )
    print(
        f"rss_growth_mb_small={med['growth_small']:.1f}  "
        f"rss_growth_mb_large={med['growth_large']:.1f}"
    )
    return {**med, **out}


if __name__ == "__main__":
    main()
