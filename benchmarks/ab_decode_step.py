"""A/B two or more versions of the C decode step (`src/tinyllm/csrc/decode_step.c`) on one GPT-2-124M-shaped model.

This VM's memory bandwidth flips between two states (~33 and ~60 GB/s) within minutes, so a change to the step
is measured by alternating the versions in one process, round after round, with a bandwidth sample (torch's
`sum` over 512 MB on 2 MB pages) before and after each round; rounds whose two samples differ by over 8% are
dropped, the rest are split by state and summarized as medians of each version's % of the roofline (weight
bytes per token over the round's bandwidth) and of the per-round differences against the first version. The
order rotates every round: the version run first after the bandwidth sample measured ~1.4 points slower at
~60 GB/s than the same code run third (torch's threads still spinning after `sum`, probably).

    .venv/bin/python benchmarks/ab_decode_step.py --variant old=/tmp/old.c --rounds 200             # kernel only
    .venv/bin/python benchmarks/ab_decode_step.py --variant old=/tmp/old.c --rounds 100 --engine    # through the engine
    .venv/bin/python benchmarks/ab_decode_step.py --engine --burst one=0 --rounds 100   # engine: bursts vs none

The current source is always the first version ("current"); `--variant NAME=FILE.c` adds others (e.g. `git show
REV:src/tinyllm/csrc/decode_step.c > /tmp/old.c`). Kernel only: the median of 15 steps at position 101. Engine:
a 128-token greedy generation from a 16-token prompt through `Engine(compile="c")`. Each version must keep the
C function's signature and the scratch layout's size (16 + 32 T + 9 C + T (C + S) floats; more is given).
`--burst NAME=SECONDS` (engine only) adds the current source run with that `Engine.burst_s` (0: one token per
call of the C step; the others run with the default).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tinyllm import fused_decode
from tinyllm.config import ModelConfig
from tinyllm.engine import Engine, Request
from tinyllm.kv_cache import KVCache
from tinyllm.model import GPT
from tinyllm.quantize import huge_page_copy, prepare_for_inference
from tinyllm.sampling import SamplingParams

FAST_GBPS = 45.0  # between this VM's two states
MAX_SPREAD = 0.08  # rounds whose two bandwidth samples differ by more are dropped


def build(name: str, source: Path, out_dir: Path):  # noqa: ANN201 (two ctypes functions)
    compiler = fused_decode._compiler()
    if compiler is None:
        sys.exit("no C compiler found")
    target = out_dir / f"{name}.so"
    cmd = [*compiler, *fused_decode.FLAGS, str(source), "-o", str(target), "-lm"]
    subprocess.run(cmd, check=True)
    library = ctypes.CDLL(str(target))
    try:
        fused_decode.entry(library)
    except AttributeError:  # a version from before `tinyllm_decode_steps`: one token per call
        return library.tinyllm_decode_step, None
    return library.tinyllm_decode_step, library.tinyllm_decode_steps


def median_time(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FILE.c", help="another version")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--engine", action="store_true", help="time generations through the engine (else the kernel)")
    ap.add_argument("--burst", action="append", default=[], metavar="NAME=SECONDS", help="engine: burst_s")
    ap.add_argument("--json", type=Path, help="write every round here")
    args = ap.parse_args()
    sources = {"current": fused_decode.SOURCE}
    bursts = {}  # version -> Engine.burst_s
    for spec in args.variant:
        name, _, path = spec.partition("=")
        sources[name] = Path(path)
    for spec in args.burst:
        name, _, seconds = spec.partition("=")
        sources[name], bursts[name] = fused_decode.SOURCE, float(seconds)
    if bursts and not args.engine:
        ap.error("--burst needs --engine")

    torch.manual_seed(0)
    model = prepare_for_inference(GPT(ModelConfig.from_name("gpt2")).eval())
    weight_bytes = sum(p.nbytes for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n)
    probe = huge_page_copy(torch.randn(512 * (1 << 20) // 4))
    engine = Engine(model, max_batch_size=1, max_seq_len=160, eos_token_id=None, compile="c")
    decoder = engine._compiled  # the C step (built and checked against eager by the engine)
    assert decoder is not None and decoder.kind == "c", "the C step did not build"
    decoder._positions, decoder._threads = 1024, 0  # room for a version with a larger scratch layout
    cache = KVCache.for_model(model.config, batch_size=1, max_seq_len=160)
    params = SamplingParams(temperature=0, max_new_tokens=128, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        fns = {name: build(name, src, Path(tmp)) for name, src in sources.items()}
        bursts.update({name: 0.0 for name, (_, many) in fns.items() if many is None})

        def bandwidth() -> float:
            return probe.nbytes / min(median_time(probe.sum, 1) for _ in range(3)) / 1e9  # best of 3

        def run(name: str) -> float:  # -> seconds per token
            decoder._fn, decoder._many = fns[name]
            engine.burst_s = bursts.get(name, Engine.burst_s)
            engine._c_step_s = None  # each version times its own first step (which sizes its bursts)
            if not args.engine:
                with torch.inference_mode():
                    return median_time(lambda: decoder.decode(5, cache, 101), 15)
            handle = engine.submit(Request(prompt=list(range(16)), params=params))
            while engine.has_work():
                engine.step()
            result = handle.result()
            # from the first token (drawn from the prefill's logits) to the last; the step that prefills also
            # decodes (one token, or a burst), so timing from the end of the first step would leave tokens out
            return (result.elapsed_s - result.time_to_first_token_s) / (result.completion_tokens - 1)

        rounds = []
        for r in range(args.rounds):
            before = bandwidth()
            names = list(fns)
            order = names[r % len(names) :] + names[: r % len(names)]  # rotated: the first place runs slower
            seconds = {name: run(name) for name in order}
            after = bandwidth()
            gbps = (before + after) / 2
            pct = {name: 100 * weight_bytes / (s * gbps * 1e9) for name, s in seconds.items()}
            rounds.append({"before": before, "after": after, "pct": pct})
            print(f"round {r}: {before:.1f}/{after:.1f} GB/s " + " ".join(f"{n} {pct[n]:.1f}%" for n in names))
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))
    kept = [x for x in rounds if abs(x["before"] - x["after"]) <= MAX_SPREAD * (x["before"] + x["after"]) / 2]
    first = next(iter(sources))
    for state, fast in (("~33 GB/s", False), ("~60 GB/s", True)):
        sel = [x for x in kept if ((x["before"] + x["after"]) / 2 >= FAST_GBPS) == fast]
        if not sel:
            continue
        line = [f"{state}: {len(sel)} rounds"]
        for name in sources:
            line.append(f"{name} {statistics.median(x['pct'][name] for x in sel):.1f}%")
            if name != first:
                diff = statistics.median(x["pct"][name] - x["pct"][first] for x in sel)
                line[-1] += f" ({diff:+.1f} vs {first})"
        print(", ".join(line))


if __name__ == "__main__":
    main()
