"""`ofs-scale prepare`: throughput with 1 and 2 workers, and peak memory as the input grows.

Synthetic jsonl shards (Zipf-distributed words, documents of 50-1500 words) are generated in a
temporary directory; a tokenizer is trained once on a sample and given to every run, so the runs
measure reading, tokenizing and writing. Each run is a fresh interpreter (`prepare_dataset` with
`progress=False`), timed from the call to its return, worker start-up included:

    tokens_per_s_1w=...  tokens_per_s_2w=...  workers_ratio=<2w/1w>   (target >= 1.7 on 2 cores)
    rss_mb_1x=...  rss_mb_10x_files=...  rss_mb_10x_file=...
    mem_ratio_files=<10 files / 1 file>  mem_ratio_file=<one 10x file / 1 file>   (target <= 1.2)

Throughput rounds alternate 1 and 2 workers and keep each side's best, so a busy machine hits
both alike. Each worker process pays a fixed start-up (about 7 s of CPU importing torch and
megatron-core), so the ratio rises towards 2 as the input grows (--shard-mb, --shards); on a
machine shared with other work, start-up and rates swing widely.

Memory is the peak resident set of the preparing process (one worker, in-process), for one
shard, for ten shards of that size, and for one shard ten times as large.

    python benchmarks/bench_prepare.py [--shard-mb 30] [--shards 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LETTERS = "etaoinshrdlucmfwypvbgkjqxz"
# Timed from before the imports: every side pays torch and megatron-core once per process.
CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from ofs_scale.data.prepare import prepare_dataset
a = json.loads(sys.argv[1])
m = prepare_dataset(a["inputs"], a["out"], tokenizer_model=a["tok"], workers=a["workers"],
                    progress=False)
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "tokens": m["tokens"], "rss_mb": rss}))
"""


def write_shard(path: Path, megabytes: float, seed: int) -> Path:
    """A jsonl file of about `megabytes` of synthetic documents."""
    rng = random.Random(seed)
    vocab_rng = random.Random(0)  # the same words in every shard
    words = [
        "".join(vocab_rng.choice(LETTERS) for _ in range(vocab_rng.randint(1, 9)))
        for _ in range(20000)
    ]
    cum = []
    total = 0.0
    for rank in range(1, len(words) + 1):
        total += 1.0 / rank
        cum.append(total)
    size, limit = 0, int(megabytes * (1 << 20))
    with path.open("w") as f:
        while size < limit:
            doc = " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(50, 1500)))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            size += len(line)
    return path


def run_child(inputs: list[Path], out: Path, tok: Path, workers: int) -> dict:
    """One preparation in a fresh interpreter; its time, tokens and peak memory."""
    shutil.rmtree(out, ignore_errors=True)
    arg = json.dumps(
        {"inputs": [str(p) for p in inputs], "out": str(out), "tok": str(tok), "workers": workers}
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", CHILD, arg], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"preparation failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the result lines and return the numbers."""
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_prepare.py")
    parser.add_argument(
        "--shard-mb",
        type=float,
        default=30.0,
        help="size of one input shard (large enough that the ~7 s of imports each worker pays "
        "at start does not dominate, as on a real corpus)",
    )
    parser.add_argument("--shards", type=int, default=8, help="shards of the throughput input")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (1 / 2 workers)")
    args = parser.parse_args(argv)
    from ofs_scale.data.prepare import prepare_dataset

    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        count = max(10, args.shards)
        shards = [write_shard(root / f"s{i}.jsonl", args.shard_mb, i) for i in range(count)]
        big = write_shard(root / "big.jsonl", 10 * args.shard_mb, 99)
        tok_dir = root / "tok"
        prepare_dataset(
            [str(shards[0])], tok_dir, vocab_size=4096, sample_bytes=1 << 21, progress=False
        )
        tok = tok_dir / "tokenizer.model"
        rates: dict[int, float] = {1: 0.0, 2: 0.0}
        for _ in range(args.rounds):
            for workers in (1, 2):
                r = run_child(shards[: args.shards], root / "out", tok, workers)
                rates[workers] = max(rates[workers], r["tokens"] / r["seconds"])
        print(
            f"tokens_per_s_1w={rates[1]:,.0f}  tokens_per_s_2w={rates[2]:,.0f}  "
            f"workers_ratio={rates[2] / rates[1]:.2f}"
        )
        one = run_child(shards[:1], root / "out", tok, 1)["rss_mb"]
        files = run_child(shards[:10], root / "out", tok, 1)["rss_mb"]
        file = run_child([big], root / "out", tok, 1)["rss_mb"]
        print(f"rss_mb_1x={one:.0f}  rss_mb_10x_files={files:.0f}  rss_mb_10x_file={file:.0f}")
        print(f"mem_ratio_files={files / one:.2f}  mem_ratio_file={file / one:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "workers_ratio": rates[2] / rates[1],
        "mem_ratio_files": files / one,
        "mem_ratio_file": file / one,
    }


if __name__ == "__main__":
    main()
