"""Decoding speed of tinyllm's engine against `transformers` on a GPT-2-124M-shaped model, side by side.

    .venv/bin/python benchmarks/bench_decode.py            # the full run recorded in BENCHMARKS.md
    .venv/bin/python benchmarks/bench_decode.py --quick    # a smoke run in well under a minute

Random weights (no download), copied into `transformers.GPT2LMHeadModel` so both run the same numbers.
Measured in one run: memory bandwidth (read: sum of a 512 MB tensor; copy), the fp32 roofline (weight bytes
per token / read bandwidth), greedy decoding of 128 tokens after a 16-token prompt at batch 1 for each
inference mode and for `transformers` `generate`, the quality change of the lossy modes against fp32 (loss,
bits per byte, KL, top-1 agreement on Shakespeare), aggregate tokens/s through the continuous-batching Engine
at 8 and 32 concurrent sequences, time to first token for a 512-token prompt, KV-cache bytes per sequence and
peak RSS (each measured in a child process so the number is its own).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tinyllm.config import ModelConfig
from tinyllm.engine import Engine, Request, generate
from tinyllm.model import GPT
from tinyllm.quantize import huge_page_copy, prepare_for_inference
from tinyllm.sampling import SamplingParams

# name -> prepare_for_inference options (None: the model as built, stock nn.Linear through MKL's gemv)
MODES: dict[str, dict | None] = {
    "fp32-stock": None,
    "fp32-4k-pages": {"dtype": "float32", "huge_pages": False},
    "fp32": {"dtype": "float32"},
    "fp32-compiled": {"dtype": "float32"},  # + the Engine's fastest batch-1 decode step (the C one for fp32)
    "fp32-inductor": {"dtype": "float32"},  # + the batch-1 decode step torch.compile builds (inductor)
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantize": "int8"},
    "int8-dynamic": {"quantize": "int8-dynamic"},
    "bf16-compiled": {"dtype": "bfloat16"},
    "int8-compiled": {"quantize": "int8"},
}
EXACT_MODE = "fp32"
# mode -> the Engine's `compile` (True: the fastest step that runs the model: C for fp32, inductor otherwise)
COMPILED_MODES: dict[str, bool | str] = {
    "fp32-compiled": True,
    "fp32-inductor": "inductor",
    "bf16-compiled": True,
    "int8-compiled": True,
}
QUALITY_FALLBACK = "The quick brown fox jumps over the lazy dog. " * 40


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"load average {load:.2f} at start"
    )


def best_and_median(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def measure_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict[str, float]:
    """Read (sum) and copy GB/s of tensors far larger than the caches, on 4 KB pages and on 2 MB pages (THP)."""
    out = {}
    for pages, make in (("4k", lambda t: t), ("2m", huge_page_copy)):
        src = make(torch.randn(megabytes * (1 << 20) // 4))  # random: no page is like another
        dst = make(torch.empty_like(src))
        src.sum(), dst.copy_(src)  # first touch
        read, _ = best_and_median(lambda src=src: src.sum(), repeats)
        copy_t, _ = best_and_median(lambda src=src, dst=dst: dst.copy_(src), repeats)
        out[f"read_{pages}_GBps"] = src.nbytes / read / 1e9
        out[f"copy_{pages}_GBps"] = 2 * src.nbytes / copy_t / 1e9
        del src, dst
    out["read_GBps"] = max(out["read_4k_GBps"], out["read_2m_GBps"])
    return out


def build_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_name("gpt2")).eval()


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes a batch-1 decode step must read: every weight once (the tied head once), one wpe row."""
    n = model.num_params(non_embedding=True) + model.config.n_embd
    return n * model.transformer.wte.weight.element_size()


def to_transformers(model: GPT):  # noqa: ANN201
    from transformers import GPT2Config, GPT2LMHeadModel

    from tinyllm.gpt2 import hf_config_dict, to_hf_state_dict

    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(model.config))).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), missing
    hf.tie_weights()
    return hf


def prepared(base: GPT, mode: str) -> GPT:
    options = MODES[mode]
    model = copy.deepcopy(base)
    return model if options is None else prepare_for_inference(model, **options)  # type: ignore[return-value]


def lossless_twins_dropped(models: dict[str, GPT]) -> dict[str, GPT]:
    """The models whose forward differs from fp32's (the compiled modes change only the decode step)."""
    return {m: model for m, model in models.items() if m not in COMPILED_MODES}


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)


def interleaved(contestants: dict[str, Callable[[], dict]], rounds: int) -> dict[str, list[dict]]:
    """Run each contestant once per round, rotating the order: a busy spell on a shared CPU hits all alike."""
    names = list(contestants)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(contestants[name]())
    return runs


def summarize(runs: list[dict], key: str) -> dict[str, float]:
    values = [run[key] for run in runs]
    return {key: max(values), f"{key}_median": statistics.median(values)}


def run_ours(model: GPT, prompt: list[int], new_tokens: int, compile: bool | str = False) -> dict:
    limit = len(prompt) + new_tokens
    (r,) = generate(model, [prompt], greedy(new_tokens), eos_token_id=None, max_seq_len=limit, compile=compile)
    decode_s = r.elapsed_s - r.time_to_first_token_s
    return {
        "tokens_per_s": r.completion_tokens / r.elapsed_s,
        "decode_tokens_per_s": (r.completion_tokens - 1) / decode_s,
        "token_ids": r.token_ids,
    }


@torch.inference_mode()
def run_transformers(hf, prompt: list[int], new_tokens: int) -> dict:  # noqa: ANN001
    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)  # the prefill alone
    t1 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    t2 = time.perf_counter()
    return {
        "tokens_per_s": new_tokens / (t2 - t1),
        "decode_tokens_per_s": (new_tokens - 1) / max(1e-9, (t2 - t1) - (t1 - t0)),
        "token_ids": out[0, len(prompt) :].tolist(),
    }


def run_batched(model: GPT, batch: int, prompt_len: int, new_tokens: int, seed: int = 1) -> dict:
    """Aggregate tokens/s of `batch` concurrent greedy requests through one Engine (prefills included)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    engine = Engine(model, max_batch_size=batch, max_queue=batch, max_seq_len=prompt_len + new_tokens)
    t = time.perf_counter()
    handles = [engine.submit(Request(prompt=p, params=greedy(new_tokens))) for p in prompts]
    while engine.has_work():
        engine.step()
    elapsed = time.perf_counter() - t
    return {"tokens_per_s": sum(h.result().completion_tokens for h in handles) / elapsed, "seconds": elapsed}


def run_ttft(model: GPT, prompt_len: int) -> dict:
    """Time to first token of one `prompt_len`-token prompt through the Engine (prefill + first draw)."""
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2))
    engine = Engine(model, max_batch_size=1, max_seq_len=prompt_len + 1)
    h = engine.submit(Request(prompt=prompt.tolist(), params=greedy(1)))
    while not h.done:
        engine.step()
    return {"ttft_s": -h.result().time_to_first_token_s}  # negated so that "max" is the best


def quality_text() -> str:
    try:
        from tinyllm import assets

        folder = assets.fetch_shakespeare()
        return next(iter(sorted(folder.glob("*.txt")))).read_text()[:40_000]
    except Exception:  # noqa: BLE001 - the benchmark still runs without the corpus
        return QUALITY_FALLBACK


@torch.inference_mode()
def quality(
    models: dict[str, GPT], reference: str, text: str, window: int, tokenizer: object | None = None
) -> dict[str, dict]:
    """Loss, bits per byte, KL to the reference and top-1 agreement of each model on `text` (GPT-2's tokens unless
    `tokenizer`, e.g. a trained checkpoint's own)."""
    from tinyllm.tokenizer import get_tokenizer

    tok = tokenizer if tokenizer is not None else get_tokenizer()
    ids = tok.encode(text)  # type: ignore[attr-defined]
    n_windows = max(1, min(4, (len(ids) - 1) // window))
    ids = ids[: n_windows * window + 1]
    n_bytes = len(tok.decode(ids[1:]).encode())  # type: ignore[attr-defined]
    x = torch.tensor(ids[:-1]).view(n_windows, window)
    y = torch.tensor(ids[1:]).view(n_windows, window)
    ref_logp = torch.log_softmax(models[reference](x).float(), -1)
    out = {}
    for name, model in models.items():
        logp = ref_logp if name == reference else torch.log_softmax(model(x).float(), -1)
        loss = float(torch.nn.functional.nll_loss(logp.flatten(0, 1), y.flatten()))
        out[name] = {
            "loss": loss,
            "bits_per_byte": loss * y.numel() / math.log(2) / n_bytes,
            "kl_to_fp32": float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()),
            "top1_agreement": float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()),
        }
    for name in out:
        out[name]["loss_change_pct"] = 100 * (out[name]["loss"] / out[reference]["loss"] - 1)
    return out


def child_peak(mode: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Run one generation in a fresh process; its peak RSS is the model, cache and activations, nothing else."""
    cmd = [sys.executable, __file__, "--child", mode, "--child-batch", str(batch)]
    cmd += ["--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _status_kb(field: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")), None)


def run_child(args: argparse.Namespace) -> None:
    model = prepared(build_model(), args.child)
    gc.collect()
    loaded_kb = _status_kb("VmRSS")
    with contextlib.suppress(OSError):  # reset the peak (VmHWM): measure serving, not building the model (Linux)
        Path("/proc/self/clear_refs").write_text("5")
    prompts = [[i % 50000 + 1] * args.prompt_len for i in range(args.child_batch)]
    engine = Engine(model, max_batch_size=args.child_batch, max_seq_len=args.prompt_len + args.new_tokens)
    for p in prompts:
        engine.submit(Request(prompt=p, params=greedy(args.new_tokens)))
    while engine.has_work():
        engine.step()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork + exec
    peak_kb = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kv = engine.kv_cache_bytes_per_sequence / 1e6
    print(
        json.dumps(
            {
                "mode": args.child,
                "batch": args.child_batch,
                "rss_after_load_MB": (loaded_kb or 0) / 1024,
                "peak_rss_MB": peak_kb / 1024,
                "kv_cache_MB_per_sequence": kv,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats, no batch 32, no children")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--batches", default="8,32", help="concurrent sequences through the Engine")
    parser.add_argument("--ttft-len", type=int, default=512)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--quality-model", help="also measure the lossy modes' quality on this trained model (spec)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    if args.quick:
        args.new_tokens, args.repeats, args.batches, args.ttft_len = 32, 1, "8", 128

    modes = args.modes.split(",")
    report: dict = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    print(report["machine"], flush=True)
    bw = measure_bandwidth()
    base = build_model()
    wbytes = weight_bytes_per_token(base)
    report["bandwidth"] = bw
    report["fp32_weight_MB_per_token"] = wbytes / 1e6
    report["fp32_roofline_tokens_per_s"] = bw["read_GBps"] * 1e9 / wbytes
    print(
        f"bandwidth: read {bw['read_4k_GBps']:.1f} GB/s (4 KB pages) / {bw['read_2m_GBps']:.1f} GB/s (2 MB pages), "
        f"copy {bw['copy_4k_GBps']:.1f} / {bw['copy_2m_GBps']:.1f} GB/s; fp32 weights {wbytes / 1e6:.0f} MB/token "
        f"-> roofline {report['fp32_roofline_tokens_per_s']:.1f} tokens/s",
        flush=True,
    )
    prompt = torch.randint(0, 50257, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    models = {mode: prepared(base, mode) for mode in modes}
    contestants: dict[str, Callable[[], dict]] = {}
    if not args.no_transformers:
        hf = to_transformers(base)
        contestants["transformers"] = lambda: run_transformers(hf, prompt, args.new_tokens)
    for mode, model in models.items():
        compiled = COMPILED_MODES.get(mode, False)
        contestants[mode] = lambda model=model, c=compiled: run_ours(model, prompt, args.new_tokens, compile=c)
    probe = huge_page_copy(torch.randn(512 * (1 << 20) // 4))  # bandwidth drifts on a shared host: sample it

    def read_bandwidth() -> dict:
        best, _ = best_and_median(lambda: probe.sum(), 3)
        return {"read_GBps": probe.nbytes / best / 1e9}

    contestants["bandwidth"] = read_bandwidth

    def bracketed(run: Callable[[], dict]) -> Callable[[], dict]:
        """A run with the read bandwidth sampled just before and just after it: its own roofline."""

        def measured() -> dict:
            before = read_bandwidth()["read_GBps"]
            result = run()
            return {**result, "read_GBps_around": (before + read_bandwidth()["read_GBps"]) / 2}

        return measured

    for mode in [m for m in contestants if m.startswith("fp32")]:
        contestants[mode] = bracketed(contestants[mode])
    for fn in contestants.values():  # warm up (first-touch of weights, kernel selection, compilation)
        fn()
    runs = interleaved(contestants, args.repeats)
    batch1_runs = {name: name_runs for name, name_runs in runs.items() if name != "bandwidth"}
    report["bandwidth_during_batch1"] = summarize(runs.pop("bandwidth"), "read_GBps")
    reference_ids = runs[EXACT_MODE][0]["token_ids"] if EXACT_MODE in runs else None
    batch1: dict[str, dict] = {}
    for name, name_runs in runs.items():
        batch1[name] = {**summarize(name_runs, "tokens_per_s"), **summarize(name_runs, "decode_tokens_per_s")}
        if reference_ids is not None:
            same = sum(a == b for a, b in zip(name_runs[0]["token_ids"], reference_ids, strict=True))
            batch1[name]["same_greedy_tokens_as_fp32"] = f"{same}/{len(reference_ids)}"
    ttft = interleaved({m: lambda m=m: run_ttft(models[m], args.ttft_len) for m in modes}, args.repeats)
    for mode in modes:
        batch1[mode]["ttft_s"] = -summarize(ttft[mode], "ttft_s")["ttft_s"]
    for name, r in batch1.items():
        print(
            f"batch 1, {name}: {r['tokens_per_s']:.1f} tokens/s end to end (median {r['tokens_per_s_median']:.1f}), "
            f"{r['decode_tokens_per_s']:.1f} decoding"
            + (f"; TTFT({args.ttft_len}) {r['ttft_s']:.3f} s" if "ttft_s" in r else ""),
            flush=True,
        )
    report["batch1"] = batch1

    if EXACT_MODE in models:
        report["quality"] = quality(
            lossless_twins_dropped(models), EXACT_MODE, quality_text(), window=256 if args.quick else 512
        )
        for name, q in report["quality"].items():
            print(
                f"quality {name}: loss {q['loss']:.4f} ({q['loss_change_pct']:+.3f}%), {q['bits_per_byte']:.4f} bpb, "
                f"KL {q['kl_to_fp32']:.2e}, top-1 agreement {100 * q['top1_agreement']:.2f}%",
                flush=True,
            )

    if args.quality_model and EXACT_MODE in models:
        from tinyllm.checkpoint import resolve_model, tokenizer_from_meta

        trained, meta = resolve_model(args.quality_model)
        variants = lossless_twins_dropped({m: prepared(trained, m) for m in modes})  # type: ignore[arg-type]
        window = min(512, trained.config.block_size)
        report["quality_trained"] = {
            "model": args.quality_model,
            **quality(variants, EXACT_MODE, quality_text(), window, tokenizer_from_meta(meta)),
        }
        for name, q in report["quality_trained"].items():
            if isinstance(q, dict):
                print(
                    f"quality on {args.quality_model} {name}: loss {q['loss']:.4f} ({q['loss_change_pct']:+.3f}%), "
                    f"{q['bits_per_byte']:.4f} bpb, KL {q['kl_to_fp32']:.2e}, top-1 {100 * q['top1_agreement']:.2f}%",
                    flush=True,
                )

    lossy = [m for m in modes if not m.startswith("fp32")]
    fastest = max(lossy, key=lambda m: batch1[m]["tokens_per_s"]) if lossy else None
    report["fastest_lossy_mode"] = fastest
    batched_modes = [EXACT_MODE] + ([fastest] if fastest and not args.quick else [])
    jobs = {
        f"{mode}@{b}": lambda mode=mode, b=int(b): run_batched(models[mode], b, args.prompt_len, args.new_tokens)
        for mode in batched_modes
        if mode in models
        for b in args.batches.split(",")
    }
    runs = interleaved(jobs, max(1, args.repeats - 1))
    report["batched"] = {name: summarize(r, "tokens_per_s") for name, r in runs.items()}
    for name, r in report["batched"].items():
        print(f"batched {name}: {r['tokens_per_s']:.1f} tokens/s in total (median {r['tokens_per_s_median']:.1f})")

    kv_fp32 = Engine(base, max_batch_size=1, max_seq_len=1).kv_cache_bytes_per_sequence * base.config.block_size
    report["kv_cache_MB_per_sequence"] = {
        "fp32_full_context": kv_fp32 / 1e6,
        "fp32_at_bench_length": kv_fp32 / base.config.block_size * (args.prompt_len + args.new_tokens) / 1e6,
    }
    if not args.quick:
        report["peak_rss"] = [
            child_peak(mode, b, args.prompt_len, args.new_tokens)
            for mode in dict.fromkeys([EXACT_MODE, fastest or EXACT_MODE])
            for b in (1, 32)
        ]
        for r in report["peak_rss"]:
            print(
                f"memory {r['mode']} batch {r['batch']}: RSS {r['rss_after_load_MB']:.0f} MB loaded, peak "
                f"{r['peak_rss_MB']:.0f} MB while generating; KV cache {r['kv_cache_MB_per_sequence']:.1f} MB/sequence",
                flush=True,
            )
    report["bandwidth_at_end"] = measure_bandwidth()
    during = report["bandwidth_during_batch1"]
    # the roofline from the bandwidth sampled between the batch-1 runs (median, and best with best)
    roof = during["read_GBps_median"] * 1e9 / wbytes
    roof_best = during["read_GBps"] * 1e9 / wbytes
    report["fp32_roofline_tokens_per_s_during"] = {"median": roof, "best": roof_best}
    print(
        f"read bandwidth during the batch-1 runs: median {during['read_GBps_median']:.1f} GB/s, best "
        f"{during['read_GBps']:.1f} -> fp32 roofline {roof:.1f} / {roof_best:.1f} tokens/s"
    )
    for mode in [m for m in modes if m.startswith("fp32")]:
        exact = batch1[mode]
        # each run against the bandwidth sampled right around it (the host's bandwidth swings 2x in minutes)
        per_run = [100 * r["decode_tokens_per_s"] * wbytes / (r["read_GBps_around"] * 1e9) for r in batch1_runs[mode]]
        pct = {
            "per_run_median": statistics.median(per_run),
            "per_run": per_run,
            "per_run_read_GBps": [r["read_GBps_around"] for r in batch1_runs[mode]],
            "per_run_decode_tokens_per_s": [r["decode_tokens_per_s"] for r in batch1_runs[mode]],
            "median_vs_median": 100 * exact["decode_tokens_per_s_median"] / roof,
            "best_vs_best": 100 * exact["decode_tokens_per_s"] / roof_best,
        }
        report.setdefault("decode_pct_of_fp32_roofline", {})[mode] = pct
        print(
            f"{mode} decode reaches {pct['per_run_median']:.0f}% of the roofline of the bandwidth around each run "
            f"(median of {', '.join(f'{p:.0f}' for p in per_run)}; at "
            f"{', '.join(f'{g:.0f}' for g in pct['per_run_read_GBps'])} GB/s); "
            f"{pct['median_vs_median']:.0f}% median vs median"
        )
    hf_rate = batch1.get("transformers", {}).get("tokens_per_s")
    if hf_rate and fastest:
        report["fastest_vs_transformers"] = batch1[fastest]["tokens_per_s"] / hf_rate
        report["fp32_vs_transformers"] = batch1[EXACT_MODE]["tokens_per_s"] / hf_rate
        print(
            f"vs transformers at batch 1: fp32 {report['fp32_vs_transformers']:.2f}x, "
            f"{fastest} {report['fastest_vs_transformers']:.2f}x"
        )
    for name, r in report["batched"].items():
        mode = name.split("@")[0]
        r["x_batch1"] = r["tokens_per_s"] / batch1[mode]["tokens_per_s"]
        print(f"batched {name}: {r['x_batch1']:.1f}x its batch-1 rate")
    report["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
