"""The `tinyllm` command line: the only argv parser. Each subcommand is a thin call into a typed function.

User errors (bad paths, bad options, unreadable data) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from tinyllm.errors import TinyLLMError

logger = logging.getLogger("tinyllm")

Handler = Callable[[argparse.Namespace], int]


class UserError(TinyLLMError):
    """A problem with the command line itself: reported as one line, exit code 2, no traceback."""


# --- fetch-assets -------------------------------------------------------------------------------


def _cmd_fetch_assets(args: argparse.Namespace) -> int:
    from tinyllm import assets

    paths = assets.fetch_all(force=args.force)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _add_fetch_assets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fetch-assets", help="fetch and verify the GPT-2 BPE ranks and the built-in corpus")
    p.add_argument("--force", action="store_true", help="fetch again even if cached copies verify")
    p.set_defaults(func=_cmd_fetch_assets)


# --- tokenize -----------------------------------------------------------------------------------


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from tinyllm.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids = tok.encode(args.text)
    tokens = tok.token_strings(ids)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": tokens}, ensure_ascii=False))
    else:
        for i, t in zip(ids, tokens, strict=True):
            print(f"{i:>6}  {t!r}")
        print(f"{len(ids)} tokens, {len(args.text.encode())} bytes")
    return 0


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="show how text splits into GPT-2 tokens")
    p.add_argument("text", help="the text to tokenize")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "tokens": [...]}')
    p.set_defaults(func=_cmd_tokenize)


# --- prepare ------------------------------------------------------------------------------------


def _cmd_prepare(args: argparse.Namespace) -> int:
    from tinyllm.data import prepare

    data = prepare(args.paths or None, val_fraction=args.val_fraction, seed=args.seed, tokenizer=args.tokenizer)
    print(f"prepared {data.dir}  (tokenizer {data.meta['tokenizer']}, sources: {', '.join(data.meta['sources'])})")
    print(f"{'split':<6} {'documents':>10} {'bytes':>14} {'tokens':>12} {'bytes/token':>12}")
    for name, s in data.meta["splits"].items():
        ratio = s["bytes"] / s["tokens"] if s["tokens"] else float("nan")
        print(f"{name:<6} {s['documents']:>10,} {s['bytes']:>14,} {s['tokens']:>12,} {ratio:>12.2f}")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into cached token shards and show its statistics")
    p.add_argument("paths", nargs="*", help="files, folders, globs or 'shakespeare' (default: the built-in corpus)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/validation split")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (default) or a trained tokenizer's name or directory")
    p.set_defaults(func=_cmd_prepare)


# --- export -------------------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tinyllm.checkpoint import find_checkpoint
    from tinyllm.export import export_hf

    checkpoint = find_checkpoint(args.checkpoint) or Path(args.checkpoint)
    out = export_hf(checkpoint, args.out_dir)
    print(f"exported {checkpoint} to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 directory (transformers, vLLM)")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, or a run directory with best/ or last/")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to write")
    p.set_defaults(func=_cmd_export)


# --- train / finetune ---------------------------------------------------------------------------

_TRAIN_OPTIONS = ["batch_size", "block_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay"]
_TRAIN_OPTIONS += ["eval_interval", "eval_iters", "device", "dtype", "compile", "run_dir", "resume", "seed"]
_BUDGETS = ("max_steps", "max_tokens", "max_minutes")


def _add_training_options(p: argparse.ArgumentParser, *, defaults: dict) -> None:
    """Options shared by train and finetune; an option left out keeps the recipe's default."""
    budget = p.add_argument_group("budget: the first reached stops training (default: --max-minutes 10)")
    budget.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    budget.add_argument("--max-tokens", type=int, metavar="N", help="training tokens (all processes together)")
    budget.add_argument("--max-minutes", type=float, metavar="M", help="wall-clock minutes; the LR decays to fit")
    p.add_argument("--batch-size", type=int, metavar="B", help=f"sequences per process ({defaults['batch_size']})")
    p.add_argument("--block-size", type=int, metavar="T", help="context length (default: the model's)")
    p.add_argument("--grad-accum", type=int, metavar="K", help=f"micro-batches per step ({defaults['grad_accum']})")
    p.add_argument("--lr", type=float, help=f"peak learning rate ({defaults['lr']:g})")
    p.add_argument("--min-lr", type=float, help="where the cosine decay ends (default: lr / 10)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help=f"linear warmup ({defaults['warmup_steps']})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW decay on 2-D weights ({defaults['weight_decay']:g})")
    p.add_argument("--eval-interval", type=int, metavar="N", help=f"eval + save every N ({defaults['eval_interval']})")
    p.add_argument("--eval-iters", type=int, metavar="N", help=f"validation batches ({defaults['eval_iters']})")
    p.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (auto)")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    p.add_argument("--dtype", choices=dtypes, help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU (faster there)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--run-dir", help=f"checkpoints, metrics.jsonl, loss.png ({defaults['run_dir']})")
    p.add_argument("--resume", action="store_true", default=None, help="continue run-dir/last exactly")
    p.add_argument("--seed", type=int, help=f"seed of init, data order and samples ({defaults['seed']})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _training_fields(args: argparse.Namespace) -> dict:
    fields = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    if any(getattr(args, k) is not None for k in _BUDGETS):  # a budget given replaces the default 10 minutes
        fields.update({k: getattr(args, k) for k in _BUDGETS})
    return fields


def _cmd_train(args: argparse.Namespace) -> int:
    from tinyllm import train

    fields = _training_fields(args)
    if args.data:
        fields["data"] = tuple(args.data)
    result = train.train(train.train_config(preset=args.preset, **fields), progress=not args.no_progress)
    if result.rank == 0:
        print(result.summary())
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from tinyllm import train

    config = train.finetune_config(init_from=args.init_from, data=args.data, **_training_fields(args))
    result = train.train(config, progress=not args.no_progress)
    if result.rank == 0:
        print(result.summary())
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from tinyllm.config import PRESETS, TrainConfig

    p = sub.add_parser("train", help="train a GPT from scratch (budgeted, resumable; DDP under torchrun)")
    p.add_argument("--preset", default="default", help=f"model shape: {', '.join(PRESETS)} (default)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="files, folders, globs or 'shakespeare' (built-in)")
    _add_training_options(p, defaults=TrainConfig().to_dict())
    p.set_defaults(func=_cmd_train)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from tinyllm.config import FINETUNE_DEFAULTS, TrainConfig

    p = sub.add_parser("finetune", help="fine-tune GPT-2 or a tinyllm checkpoint on your text")
    models = "gpt2, a hub id, a Hugging Face GPT-2 directory or a tinyllm checkpoint"
    p.add_argument("--from", dest="init_from", required=True, metavar="MODEL", help=models)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="files, folders, globs or 'shakespeare'")
    _add_training_options(p, defaults={**TrainConfig().to_dict(), **FINETUNE_DEFAULTS})
    p.set_defaults(func=_cmd_finetune)


# --- evaluate / compare -------------------------------------------------------------------------


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    """Options shared by evaluate and compare: the held-out text, the window, the samples, the report."""
    heldout = "held-out text: files, folders, globs or a prepared data directory (default: the checkpoint's own"
    p.add_argument("--data", nargs="+", metavar="PATH", help=heldout + " validation split, else the built-in one)")
    p.add_argument("--context", type=int, metavar="N", help="tokens per window (default: the model's block size)")
    p.add_argument("--stride", type=int, metavar="N", help="tokens between windows (default: half the context)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of the held-out text")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward pass (8)")
    p.add_argument("--seed", type=int, nargs="+", default=[1337], help="sampling seeds, one sample each (1337)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per sample (64)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (auto)")
    report = "also write DIR/report.md with plots (with the run's loss curves when the model is a run directory)"
    p.add_argument("--report", metavar="DIR", help=report)
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _eval_kwargs(args: argparse.Namespace) -> dict:
    from tinyllm.sampling import SamplingParams
    from tinyllm.train import detect_device

    return dict(
        data=args.data, context=args.context, stride=args.stride, max_tokens=args.max_tokens,
        batch_size=args.batch_size, device=detect_device(args.device), seeds=tuple(args.seed),
        params=SamplingParams(max_new_tokens=args.max_new_tokens), progress=not args.json,
    )  # fmt: skip


def _print_results(args: argparse.Namespace, results: list, *, run_spec: str | None) -> None:
    from pathlib import Path

    from tinyllm.report import text_summary, write_report

    if args.report:
        run_dir = None
        if run_spec and Path(run_spec).is_dir():  # a run directory, or its best/ or last/ checkpoint
            candidates = (Path(run_spec), Path(run_spec).parent)
            run_dir = next((d for d in candidates if (d / "metrics.jsonl").is_file()), None)
        report = write_report(args.report, run_dir=run_dir, results=results)
    if args.json:
        print(json.dumps({"models": [r.to_dict() for r in results]}, indent=2, ensure_ascii=False))
    else:
        print(text_summary(results), end="")
    if args.report:
        print(f"report: {report}", file=sys.stderr if args.json else sys.stdout)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tinyllm.evaluate import load_prompts, measure_model

    prompts = load_prompts(args.prompts) if args.prompts else []
    result = measure_model("model", args.model, prompts=prompts, **_eval_kwargs(args))
    _print_results(args, [result], run_spec=args.model)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tinyllm.checkpoint import find_checkpoint
    from tinyllm.evaluate import DEFAULT_PROMPTS, compare_models, load_prompts

    custom = args.custom
    if custom is None and find_checkpoint("runs/default") is not None:
        custom = "runs/default"
    elif custom is None:
        logger.warning("no --custom model and no runs/default checkpoint: showing GPT-2 alone")
    prompts = load_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    gpt2 = None if args.gpt2 == "none" else args.gpt2
    results = compare_models(custom=custom, gpt2=gpt2, prompts=prompts, **_eval_kwargs(args))
    _print_results(args, results, run_spec=custom)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="bits per byte on held-out text (sliding window); optional samples")
    models = "checkpoint, run directory, 'gpt2', a hub id or a Hugging Face GPT-2 directory"
    p.add_argument("--model", required=True, metavar="CKPT|gpt2", help=models)
    p.add_argument("--prompts", metavar="FILE", help="also sample these prompts (one per line) and measure repetition")
    _add_eval_options(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="your model and GPT-2 side by side: same prompts, seeds and held-out bytes")
    p.add_argument("--prompts", metavar="FILE", help="prompts, one per line (default: the built-in set of 8)")
    p.add_argument("--custom", metavar="CKPT", help="your checkpoint or run directory (default: runs/default)")
    sources = "gpt2[-medium|-large|-xl], a hub id, a local Hugging Face directory or 'none' (default gpt2)"
    p.add_argument("--gpt2", default="gpt2", metavar="SOURCE", help=sources + "; shown as unavailable if it can't load")
    _add_eval_options(p)
    p.set_defaults(func=_cmd_compare)


# --- tokenizer train -----------------------------------------------------------------------------


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from tinyllm.data import train_tokenizer
    from tinyllm.tokenizer import trained_tokenizers_dir

    tok = train_tokenizer(
        args.paths or None, vocab_size=args.vocab_size, val_fraction=args.val_fraction, seed=args.seed
    )
    print(f"trained {tok.name}: {tok.vocab_size} tokens, saved in {trained_tokenizers_dir() / tok.name}")
    print(f"use it with: tinyllm prepare --tokenizer {tok.name}  (or tinyllm train --tokenizer {tok.name})")
    return 0


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train on the training split of a corpus (default: the built-in one)")
    t.add_argument("paths", nargs="*", help="files, folders, globs or 'shakespeare' (default: the built-in corpus)")
    t.add_argument("--vocab-size", type=int, default=8192, help="tokens, <|endoftext|> included (default 8192)")
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    t.add_argument("--seed", type=int, default=1337, help="seed of the train/validation split")
    t.set_defaults(func=_cmd_tokenizer_train)


# --- parser -------------------------------------------------------------------------------------

# Each entry adds one subcommand; modules that own a subcommand add theirs here.
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_fetch_assets,
    _add_tokenize,
    _add_prepare,
    _add_tokenizer,
    _add_export,
    _add_train,
    _add_finetune,
    _add_evaluate,
    _add_compare,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyllm", description="Learn, train and serve a small GPT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except TinyLLMError as exc:
        print(f"tinyllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
