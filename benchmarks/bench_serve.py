"""Serving throughput and latency: N concurrent streaming clients against a real server on loopback.

The server runs in a subprocess (this script with `--serve`): a random-init model of a realistic size (the
"default" preset, prepared for inference the way the server prepares checkpoints) behind uvicorn, with the
GPT-2 tokenizer. Each client sends streaming `/v1/completions` requests one after another; the script
reports aggregate generated tokens/s, p50/p95 time to first token and request latency, and errors, for
each concurrency level. Continuous batching should give at 8 clients at least 4x the aggregate throughput
of one client at a time.

    .venv/bin/python benchmarks/bench_serve.py                      # 1, 8 and 32 clients
    .venv/bin/python benchmarks/bench_serve.py --clients 1 8 --requests 3 --max-tokens 32 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

logger = logging.getLogger("bench_serve")

PROMPTS = [
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent made glorious summer",
    "The quality of mercy is not strained; it droppeth as",
    "All the world's a stage, and all the men and women merely",
    "Friends, Romans, countrymen, lend me your ears; I come to",
    "If music be the food of love, play on; give me excess of it",
    "What's in a name? That which we call a rose by any other",
    "Once more unto the breach, dear friends, once more; or close",
]


@dataclass
class Level:
    """Results of one concurrency level."""

    clients: int
    requests: int
    errors: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    latency_p50_ms: float
    latency_p95_ms: float


# --- the server (child process) ----------------------------------------------------------------------------------


def serve_child(args: argparse.Namespace) -> None:
    """Run the server with a random-init model of the chosen preset until killed."""
    import torch
    import uvicorn

    from tinyllm.config import ModelConfig
    from tinyllm.engine import prepare_for_inference
    from tinyllm.model import GPT
    from tinyllm.server import ServerSettings, create_app
    from tinyllm.server.worker import LoadedModel
    from tinyllm.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = prepare_for_inference(GPT(ModelConfig.from_name(args.preset)).eval())
    tokenizer = get_tokenizer()
    settings = ServerSettings(
        port=args.port,
        checkpoint=None,
        gpt2=None,
        slots=args.slots,
        max_queue=256,
        request_timeout_s=600,
        torch_threads=args.torch_threads,
    )
    app = create_app(settings, loaders={"custom": lambda: LoadedModel(model, tokenizer, {"source": args.preset})})
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# --- the clients -------------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _one_request(client, prompt: str, *, max_tokens: int, seed: int) -> tuple[float, float, int]:  # noqa: ANN001
    """(time to first token, latency, generated tokens) of one streaming completion."""
    body = {
        "model": "custom",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "top_k": 50,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            # parse only what is needed, so the client (on the same CPU) stays light next to the server
            if '"usage": {' in line or '"error"' in line:
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return ttft if ttft is not None else latency, latency, tokens


async def run_level(base_url: str, *, clients: int, requests_per_client: int, max_tokens: int) -> Level:
    import httpx

    ttfts: list[float] = []
    latencies: list[float] = []
    tokens = 0
    errors = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def worker(i: int) -> None:
            nonlocal tokens, errors
            for j in range(requests_per_client):
                try:
                    ttft, latency, n = await _one_request(
                        client, PROMPTS[(i + j) % len(PROMPTS)], max_tokens=max_tokens, seed=i * 1000 + j
                    )
                except Exception as exc:  # counted and reported, the benchmark goes on
                    logger.warning("request failed: %s", exc)
                    errors += 1
                    continue
                ttfts.append(ttft)
                latencies.append(latency)
                tokens += n

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - start
    return Level(
        clients=clients,
        requests=clients * requests_per_client,
        errors=errors,
        tokens=tokens,
        wall_s=round(wall, 2),
        tokens_per_s=round(tokens / wall, 1),
        ttft_p50_ms=round(_percentile(ttfts, 50) * 1000, 1),
        ttft_p95_ms=round(_percentile(ttfts, 95) * 1000, 1),
        latency_p50_ms=round(_percentile(latencies, 50) * 1000, 1),
        latency_p95_ms=round(_percentile(latencies, 95) * 1000, 1),
    )


def _median_level(levels: list[Level]) -> Level:
    """The round with the median throughput (its latencies come with it); errors summed over rounds."""
    ranked = sorted(levels, key=lambda lv: lv.tokens_per_s)
    median = ranked[(len(ranked) - 1) // 2]
    return Level(**{**asdict(median), "errors": sum(lv.errors for lv in levels)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base_url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="model preset (random init; default: default)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--slots", type=int, default=32, help="the server's continuous-batch size")
    p.add_argument("--torch-threads", type=int, default=None, help="server's torch threads (default: cores - 1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every level this often; report the median round")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.serve:
        logging.getLogger().setLevel(logging.WARNING)  # no access log lines in the measurements
        serve_child(args)
        return 0

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        __file__,
        "--serve",
        "--port",
        str(port),
        "--preset",
        args.preset,
        "--slots",
        str(args.slots),
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_ready(base_url, proc)
        asyncio.run(run_level(base_url, clients=1, requests_per_client=1, max_tokens=8))  # warm-up
        runs: dict[int, list[Level]] = {c: [] for c in args.clients}
        for r in range(args.rounds):  # rounds interleave the levels, so a noisy neighbour hits them alike
            for clients in args.clients:
                level = asyncio.run(
                    run_level(base_url, clients=clients, requests_per_client=args.requests, max_tokens=args.max_tokens)
                )
                logger.info(
                    "round %d, %d clients: %.1f tokens/s, %d errors", r + 1, clients, level.tokens_per_s, level.errors
                )
                runs[clients].append(level)
        levels = [_median_level(runs[c]) for c in args.clients]
    finally:
        proc.terminate()
        proc.wait(10)

    base = next((lv.tokens_per_s for lv in levels if lv.clients == 1), None)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "preset": args.preset,
        "max_tokens": args.max_tokens,
        "slots": args.slots,
        "rounds": args.rounds,
        "torch_threads": args.torch_threads if args.torch_threads is not None else "auto (cores - 1)",
        "all_tokens_per_s": {c: [lv.tokens_per_s for lv in runs[c]] for c in args.clients},
        "levels": [asdict(lv) for lv in levels],
        "speedup_vs_1_client": {lv.clients: round(lv.tokens_per_s / base, 2) for lv in levels} if base else {},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{'clients':>7} {'reqs':>5} {'err':>4} {'tokens':>7} {'tok/s':>8} {'x1':>5} "
            f"{'TTFT p50':>9} {'p95':>8} {'latency p50':>12} {'p95':>8}"
        )
        for lv in levels:
            x = report["speedup_vs_1_client"].get(lv.clients, float("nan"))
            print(
                f"{lv.clients:>7} {lv.requests:>5} {lv.errors:>4} {lv.tokens:>7} {lv.tokens_per_s:>8.1f} {x:>5.2f} "
                f"{lv.ttft_p50_ms:>7.0f}ms {lv.ttft_p95_ms:>6.0f}ms {lv.latency_p50_ms:>10.0f}ms "
                f"{lv.latency_p95_ms:>6.0f}ms"
            )
    return 1 if any(lv.errors for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
