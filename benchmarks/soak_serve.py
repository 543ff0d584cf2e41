"""A server under mixed load for a while, its resident memory sampled every 15 s.

    .venv/bin/python benchmarks/soak_serve.py --checkpoint runs/default --seconds 300

Starts `tinyllm serve` (no GPT-2) on a free port, then 8 clients send, at random: seed-route requests,
streaming completions (a third of them hung up mid-stream), chat completions with n <= 4 and logprobs, and
echoed completions with logprobs, with prompts of 1-200 words. Prints the server's RSS and the request count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "the",
    "realm",
    "went",
    "forth",
    "to",
    "battle",
    "with",
    "their",
    "armies",
    "at",
    "dawn",
]


def rss_mb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) // 1024 for line in text.splitlines() if line.startswith("VmRSS"))


def post(url: str, body: dict, *, hang_up: bool = False) -> None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read(200) if hang_up else response.read()
    except OSError:
        pass


def client(base: str, seed: int, stop: float, count: list[int]) -> None:
    rnd = random.Random(seed)
    while time.monotonic() < stop:
        prompt = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 200)))
        kind = rnd.random()
        if kind < 0.3:
            post(f"{base}/generate/custom", {"prompt": prompt, "max_new_tokens": rnd.randint(1, 64)})
        elif kind < 0.6:
            body = {"model": "custom", "prompt": prompt, "max_tokens": rnd.randint(1, 64), "stream": True}
            post(f"{base}/v1/completions", body, hang_up=rnd.random() < 0.3)
        elif kind < 0.8:
            messages = [{"role": "user", "content": prompt}]
            body = {"model": "custom", "messages": messages, "max_tokens": 32, "n": rnd.randint(1, 4)}
            post(f"{base}/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 3})
        else:
            body = {"model": "custom", "prompt": prompt, "max_tokens": 16, "echo": True, "logprobs": 2, "n": 2}
            post(f"{base}/v1/completions", body)
        count[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory to serve")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TINYLLM_GPT2": "off", "TINYLLM_CHECKPOINT": args.checkpoint, "TINYLLM_PORT": str(port)}
    cmd = [sys.executable, "-m", "tinyllm", "serve"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        t0 = time.monotonic()
        stop, count = t0 + args.seconds, [0]
        threads = [
            threading.Thread(target=client, args=(base, i, stop, count), daemon=True) for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        while time.monotonic() < stop:
            print(f"{time.monotonic() - t0:6.0f} s  RSS {rss_mb(server.pid)} MB  {count[0]} requests", flush=True)
            time.sleep(15)
        for t in threads:
            t.join()
        print(f"end: RSS {rss_mb(server.pid)} MB, {count[0]} requests in {args.seconds:g} s", flush=True)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
