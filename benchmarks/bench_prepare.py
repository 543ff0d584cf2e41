"""Tokenization throughput (MB/s) and peak memory of `tinyllm prepare` on a generated corpus.

    .venv/bin/python benchmarks/bench_prepare.py --mb 100

The corpus is made of lines of the built-in corpus, shuffled with a fixed seed into files of ~1 MB, so it
reads like real text but is not cached. Preparation runs in a child process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(root: Path, *, megabytes: int, seed: int = 0) -> int:
    from tinyllm import assets

    lines = [
        line
        for p in sorted(assets.fetch_shakespeare().glob("*.txt"))
        for line in p.read_text().splitlines(keepends=True)
    ]
    rng = random.Random(seed)
    total = 0
    for i in range(megabytes):
        rng.shuffle(lines)
        chunk, size = [], 0
        for line in lines:
            chunk.append(line)
            size += len(line)
            if size >= 1 << 20:
                break
        text = "".join(chunk)
        (root / f"part{i:04d}.txt").write_text(text)
        total += len(text.encode())
    return total


def child(corpus: str, cache: str, threads: int) -> None:
    from tinyllm.data import prepare

    start = time.perf_counter()
    data = prepare([corpus], cache_dir=cache, num_threads=threads, progress=False)
    seconds = time.perf_counter() - start
    tokens = data.num_tokens("train") + data.num_tokens("val")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MB")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus, cache = Path(tmp) / "corpus", Path(tmp) / "cache"
        corpus.mkdir()
        nbytes = make_corpus(corpus, megabytes=args.mb)
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", str(corpus), str(cache)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    mb = nbytes / 1e6
    print(f"corpus: {mb:.1f} MB in {args.mb} files; threads: {args.threads}")
    print(f"prepare: {result['seconds']:.2f} s, {mb / result['seconds']:.1f} MB/s, {result['tokens']:,} tokens")
    print(f"peak RSS of the preparing process: {result['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
