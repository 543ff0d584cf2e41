"""Training throughput (tokens/s) and MFU per preset: fp32 vs bf16 autocast vs torch.compile.

    .venv/bin/python benchmarks/bench_train.py --seconds 20 [--threads 1]

Each configuration runs the real optimizer step of `tinyllm.train` (`train_step`: forward, cross-entropy,
backward, clipping, AdamW) on random token batches of the preset's recipe shape for about `--seconds`
after a few warm-up steps (compilation happens in the warm-up). The timed seconds are split into rounds
that visit every configuration in turn, so load from other processes on a shared machine hits all alike;
the best round counts (the median is shown too). MFU is achieved model FLOP/s (`GPT.flops_per_token`,
6N + attention) over the best matmul rate of the run's own precision (fp32 or bf16, 2048^3, measured in the
same rounds); "of fp32 peak" compares every variant with the fp32 rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

from tinyllm.config import PRESETS
from tinyllm.model import GPT
from tinyllm.optim import configure_optimizer
from tinyllm.train import train_step

# The recipe shape per preset: (batch, block). "default" is the 10-minute CPU recipe.
SHAPES = {"seed": (16, 128), "default": (8, 256)}
VARIANTS = {
    "fp32": (torch.float32, False),
    "bf16 autocast": (torch.bfloat16, False),
    "fp32 + compile": (torch.float32, True),
    "bf16 + compile": (torch.bfloat16, True),
}


def matmul_peak(dtype: torch.dtype, *, n: int = 2048, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of an n x n matmul in `dtype` on this CPU."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


class Config:
    """One (preset, variant): the model, its optimizer and a fixed random batch, warmed up."""

    def __init__(self, preset: str, variant: str, *, warmup: int) -> None:
        self.preset, self.variant = preset, variant
        self.dtype, compile_ = VARIANTS[variant]
        self.batch, self.block = SHAPES[preset]
        torch.manual_seed(0)
        self.raw = GPT(PRESETS[preset])
        self.model = torch.compile(self.raw) if compile_ else self.raw
        self.opt = configure_optimizer(self.raw, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
        self.x = torch.randint(0, self.raw.config.vocab_size, (self.batch, self.block + 1))
        start = time.perf_counter()
        for _ in range(warmup):
            self.step()
        self.warmup_s = time.perf_counter() - start
        self.rates: list[float] = []

    def step(self) -> float:
        x = self.x
        loss, _ = train_step(self.model, self.opt, lambda: (x[:, :-1], x[:, 1:]), amp_dtype=self.dtype, grad_clip=1.0)
        return loss.item()

    def run(self, seconds: float) -> None:
        """Time whole steps for about `seconds` (at least two) and record tokens/s."""
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or steps < 2:
            self.step()
            steps += 1
        self.rates.append(steps * self.batch * self.block / (time.perf_counter() - start))

    def result(self, peaks: dict[torch.dtype, float]) -> dict:
        best = max(self.rates)
        flops = self.raw.flops_per_token(seq_len=self.block) * best
        return {
            "preset": self.preset,
            "variant": self.variant,
            "batch": self.batch,
            "block": self.block,
            "params": self.raw.num_params(),
            "tokens_per_s": best,
            "tokens_per_s_median": statistics.median(self.rates),
            "ms_per_step": 1000 * self.batch * self.block / best,
            "flops": flops,
            "mfu": flops / peaks[self.dtype],
            "of_fp32_peak": flops / peaks[torch.float32],
            "warmup_s": self.warmup_s,
            "rounds": self.rates,
        }


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per configuration")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the seconds are split into")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--presets", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    configs = [Config(p, v, warmup=args.warmup) for p in args.presets for v in args.variants]
    peaks: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for _ in range(args.rounds):  # interleaved, so a burst of load elsewhere hits every configuration alike
        for dtype, values in peaks.items():
            values.append(matmul_peak(dtype))
        for c in configs:
            c.run(args.seconds / args.rounds)
    peak32, peak16 = max(peaks[torch.float32]), max(peaks[torch.bfloat16])
    rows = [c.result({torch.float32: peak32, torch.bfloat16: peak16}) for c in configs]

    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"matmul peak (2048^3, best of {args.rounds}): fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f}\n")
    columns = ["preset", "batch x block", "variant", "ms/step", "tokens/s best", "median", "GFLOP/s", "MFU"]
    print("| " + " | ".join([*columns, "of fp32 peak", "warm-up s"]) + " |")
    print("|---|---|---|" + "---:|" * 7)
    for r in rows:
        cells = [r["preset"], f"{r['batch']} x {r['block']}", r["variant"], f"{r['ms_per_step']:.0f}"]
        cells += [f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s_median']:,.0f}", f"{r['flops'] / 1e9:.0f}"]
        cells += [f"{r['mfu']:.1%}", f"{r['of_fp32_peak']:.1%}", f"{r['warmup_s']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        print(json.dumps({"peak_fp32": peak32, "peak_bf16": peak16, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
