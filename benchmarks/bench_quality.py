"""The quality race's yardstick: train the default recipe from scratch, then measure what it learned.

    .venv/bin/python benchmarks/bench_quality.py                  # the 10-minute default recipe
    .venv/bin/python benchmarks/bench_quality.py --minutes 0.5    # a quick check that it all runs

Prints the held-out bits per byte on the held-out works of the built-in corpus's split (sliding window,
context = block_size, stride = half of it, so every byte is scored with at least half a window before it),
then the seed prompt's 64-token continuation under the served sampling defaults (`/generate/custom`:
T 0.8, top-k 50, top-p 0.95, repetition penalty 1.2) and its share of repeated 4-grams, and over 16 seeds
how many continuations have none, with those defaults and without the penalty. `--json` prints the same
as one JSON object; `--report DIR` also writes the Markdown report with the loss curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

SEED_PROMPT = "The future of AI is"


def held_out_works(*, val_fraction: float, seed: int = 1337) -> list[str]:
    """Which documents of the built-in corpus the split holds out (the same rule `prepare` applies)."""
    from tinyllm.corpus import iter_document_ids, make_split, resolve_sources

    ids = [d for f in resolve_sources(None) for d in iter_document_ids(f)]
    split = make_split(ids, val_fraction=val_fraction, seed=seed)
    return [d.split("/", 1)[-1] for d in ids if split.is_val(d)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget in wall-clock minutes (10)")
    parser.add_argument("--run-dir", default="runs/bench_quality", help="where the run goes (runs/bench_quality)")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed of the continuation (1337)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--processes", help="training processes: N or auto (default: the recipe's, auto)")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="FIELD=VALUE", help="TrainConfig overrides (JSON values)"
    )
    parser.add_argument("--max-tokens", type=int, help="score only the first N held-out tokens (quick checks)")
    parser.add_argument("--report", metavar="DIR", help="also write the Markdown report with plots there")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (always off with --json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")

    from tinyllm.checkpoint import find_checkpoint, load_checkpoint
    from tinyllm.evaluate import ModelResults, evaluate_model, generate_samples, generation_metrics, training_heldout
    from tinyllm.sampling import SamplingParams
    from tinyllm.server.settings import SamplingDefaults
    from tinyllm.train import default_config, detect_device, resolve_processes, train

    device = detect_device(args.device)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.processes:
        overrides["processes"] = args.processes if args.processes == "auto" else int(args.processes)
    if isinstance(overrides.get("model"), dict):  # e.g. model={"dropout": 0.1}: the default preset, changed
        from dataclasses import replace

        from tinyllm.config import PRESETS

        base = default_config()
        model = replace(PRESETS[base.preset], **overrides.pop("model"))
        overrides = {"model": model, "tokenizer": base.tokenizer_spec, "processes": base.processes_spec, **overrides}
    # the benchmark's own directory: each run replaces the last, whatever its --set (another recipe)
    overrides.setdefault("overwrite", True)
    config = default_config(minutes=args.minutes, run_dir=args.run_dir, device=str(device), **overrides)
    progress = not (args.json or args.no_progress)
    trained = train(config, progress=progress)
    checkpoint = find_checkpoint(args.run_dir)
    assert checkpoint is not None, f"training wrote no checkpoint in {args.run_dir}"

    loaded = load_checkpoint(checkpoint, device=device)
    started = time.perf_counter()
    data = training_heldout(args.run_dir)
    result = evaluate_model(
        loaded.model,
        data=data,
        device=device,
        max_tokens=args.max_tokens,
        progress=progress,
        tokenizer=loaded.tokenizer(),
    )
    eval_seconds = time.perf_counter() - started
    # the sampling defaults of the served /generate/custom (64 new tokens, T 0.8, top-k 50, top-p 0.95, CTRL
    # repetition penalty 1.2), and for comparison the library's (the same without the penalty)
    params = SamplingDefaults().params()
    (sample,) = generate_samples(
        loaded.model, [SEED_PROMPT], params=params, seeds=(args.seed,), tokenizer=loaded.tokenizer()
    )
    metrics = generation_metrics([sample.token_ids], texts=[sample.text])
    seeds = tuple(range(args.seed - 7, args.seed + 9))  # 16 seeds around the shown one
    zero_repeats = {}
    for name, p in {"served": params, "library": SamplingParams(max_new_tokens=64)}.items():
        samples = generate_samples(loaded.model, [SEED_PROMPT], params=p, seeds=seeds, tokenizer=loaded.tokenizer())
        zero_repeats[name] = sum(generation_metrics([x.token_ids]).repeated_4gram_share == 0 for x in samples)

    summary = {
        "minutes": args.minutes,
        "device": str(device),
        "processes": resolve_processes(config),
        "overrides": {k: str(v) for k, v in overrides.items()},
        "checkpoint": str(checkpoint),
        "parameters": loaded.model.num_params(),
        "steps": trained.steps,
        "tokens": trained.tokens,
        "train_seconds": round(trained.seconds, 1),
        "tokens_per_second": round(trained.tokens_per_second, 1),
        "held_out_works": held_out_works(val_fraction=config.val_fraction),
        "eval": result.to_dict(),
        "eval_seconds": round(eval_seconds, 1),
        "sampling": {
            k: getattr(params, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
        },
        "seed": args.seed,
        "prompt": SEED_PROMPT,
        "continuation": sample.text,
        "continuation_tokens": len(sample.token_ids),
        "repeated_4gram_share": metrics.repeated_4gram_share,
        "repeated_4gram_share_words": metrics.repeated_4gram_share_words,
        "seeds_without_repeated_4grams": {k: f"{v}/{len(seeds)}" for k, v in zero_repeats.items()},
    }
    if args.report:
        from tinyllm.report import write_report

        results = [ModelResults("custom", str(checkpoint), eval=result, samples=[sample], metrics=metrics)]
        summary["report"] = str(write_report(args.report, run_dir=args.run_dir, results=results))
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    e = result
    print(f"\ndefault recipe {overrides or ''}, {args.minutes:g} min, {device} x {summary['processes']}: "
          f"{trained.steps:,} steps, {trained.tokens:,} tokens "
          f"({trained.tokens_per_second:,.0f} tokens/s), {summary['parameters'] / 1e6:.1f}M parameters")  # fmt: skip
    print(f"held-out works ({len(summary['held_out_works'])}): {', '.join(summary['held_out_works'])}")
    print(f"held-out bits per byte: {e.bits_per_byte:.4f}  ({e.loss_nats_per_token:.4f} nats/token, perplexity "
          f"{e.perplexity:.1f}; {e.tokens_scored:,} tokens, {e.bytes:,} bytes; {eval_seconds:.1f}s)")  # fmt: skip
    print(f"method: {e.method}")
    print(f"\n{SEED_PROMPT!r} + {len(sample.token_ids)} tokens (seed {args.seed}, {summary['sampling']}):")
    print(f"  {SEED_PROMPT}{sample.text}".replace("\n", "\n  "))
    print(f"repeated 4-gram share: {metrics.repeated_4gram_share:.3f} of tokens "
          f"({metrics.repeated_4gram_share_words:.3f} of words)")  # fmt: skip
    n = len(seeds)
    print(f"seeds {seeds[0]}-{seeds[-1]} without a repeated token 4-gram: served defaults {zero_repeats['served']}/{n}"
          f", without the repetition penalty {zero_repeats['library']}/{n}")  # fmt: skip
    if args.report:
        print(f"report: {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
