"""The `tinyllm` command line: the only argv parser. Each subcommand is a thin call into a typed function.

User errors (bad paths, bad options, unreadable data) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tinyllm.errors import TinyLLMError

if TYPE_CHECKING:
    from tinyllm.sampling import SamplingParams
    from tinyllm.train import TrainResult

logger = logging.getLogger("tinyllm")

Handler = Callable[[argparse.Namespace], int]


class UserError(TinyLLMError):
    """A problem with the command line itself: reported as one line, exit code 2, no traceback."""


def _positive(value: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _seed(value: str) -> int:
    """An argparse type: a seed in [0, 2**63), what torch's and numpy's generators take."""
    try:
        n = int(value)
    except ValueError:
        n = -1
    if not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value!r}")
    return n


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
    from tinyllm.checkpoint import model_tokenizer
    from tinyllm.tokenizer import get_tokenizer

    tok = model_tokenizer(args.model) if args.model else get_tokenizer(args.tokenizer)
    text = args.text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # argv need not be UTF-8
    ids = tok.encode(text)
    tokens = tok.token_strings(ids, escape_partial=True)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": tokens, "tokenizer": tok.name}, ensure_ascii=False))
    else:
        for i, t in zip(ids, tokens, strict=True):
            print(f"{i:>6}  {t!r}")
        n, size = len(ids), len(text.encode())
        print(f"{n} token{'s' * (n != 1)}, {size} byte{'s' * (size != 1)} ({tok.name}, {tok.vocab_size:,} tokens)")
    return 0


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="show how text splits into tokens (GPT-2's, or a model's own)")
    p.add_argument("text", help="the text to tokenize")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--tokenizer", default="gpt2", help="gpt2 (default), a trained tokenizer's name, or a tokenizer directory"
    )
    which.add_argument("--model", help="the tokenizer of this checkpoint, run directory or Hugging Face directory")
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "tokens": [...], "tokenizer": name}')
    p.set_defaults(func=_cmd_tokenize)


# --- prepare ------------------------------------------------------------------------------------


def _cmd_prepare(args: argparse.Namespace) -> int:
    from tinyllm.data import prepare

    data = prepare(args.paths or None, val_fraction=args.val_fraction, seed=args.seed, tokenizer=args.tokenizer)
    print(f"prepared {data.dir}  (tokenizer {data.meta['tokenizer']}, sources: {', '.join(data.meta['sources'])})")
    print(f"{'split':<6} {'documents':>10} {'bytes':>14} {'tokens':>12} {'bytes/token':>12}")
    for name, s in data.meta["splits"].items():
        ratio = f"{s['bytes'] / s['tokens']:.2f}" if s["tokens"] else "-"  # an empty split (--val-fraction 0)
        print(f"{name:<6} {s['documents']:>10,} {s['bytes']:>14,} {s['tokens']:>12,} {ratio:>12}")
    return 0


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into cached token shards and show its statistics")
    p.add_argument("paths", nargs="*", help="files, folders, globs or 'shakespeare' (default: the built-in corpus)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    p.add_argument("--seed", type=_seed, default=1337, help="seed of the train/validation split (1337)")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="gpt2 (default), bpe:N (train an N-token BPE; the default recipe uses bpe:4096), or a trained one",
    )
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

_TRAIN_OPTIONS = [
    "batch_size",
    "block_size",
    "grad_accum",
    "optimizer",
    "lr",
    "muon_lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
]
_TRAIN_OPTIONS += ["eval_interval", "eval_minutes", "eval_iters", "device", "dtype", "compile", "run_dir", "resume"]
_TRAIN_OPTIONS += ["seed", "processes", "overwrite"]
_BUDGETS = ("max_steps", "max_tokens", "max_minutes")


def _processes(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return _positive(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def _add_training_options(p: argparse.ArgumentParser, *, defaults: dict) -> None:
    """Options shared by train and finetune; an option left out keeps the recipe's default."""
    budget = p.add_argument_group("budget: the first reached stops training (default: --max-minutes 10)")
    budget.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    budget.add_argument("--max-tokens", type=int, metavar="N", help="training tokens (all processes together)")
    budget.add_argument(
        "--max-minutes",
        type=float,
        metavar="M",
        help="wall-clock minutes of training, its evaluations and saves included (start-up, such as preparing "
        "the data, is not); the LR decays to fit",
    )
    p.add_argument(
        "--processes",
        type=_processes,
        metavar="N|auto",
        help="DDP processes on this machine; auto: one per CPU core (up to 4) on a CPU, else 1 "
        "(default: auto for the default recipe, else 1; under torchrun ignored)",
    )
    p.add_argument("--batch-size", type=int, metavar="B", help=f"sequences per process ({defaults['batch_size']})")
    p.add_argument("--block-size", type=int, metavar="T", help="context length (default: the model's)")
    p.add_argument("--grad-accum", type=int, metavar="K", help=f"micro-batches per step ({defaults['grad_accum']})")
    p.add_argument(
        "--optimizer",
        choices=("muon", "adamw"),
        help=f"muon: Muon on the blocks' matrices + AdamW ({defaults['optimizer']})",
    )
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate ({defaults['lr']:g})")
    p.add_argument("--muon-lr", type=float, help=f"peak Muon learning rate ({defaults['muon_lr']:g})")
    p.add_argument("--min-lr", type=float, help="where the cosine decay ends (default: lr / 10)")
    p.add_argument("--warmup-steps", type=int, metavar="N", help=f"linear warmup ({defaults['warmup_steps']})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW decay on 2-D weights ({defaults['weight_decay']:g})")
    p.add_argument("--eval-interval", type=int, metavar="N", help=f"eval + save every N ({defaults['eval_interval']})")
    p.add_argument("--eval-minutes", type=float, metavar="M", help=f"... or M minutes ({defaults['eval_minutes']:g})")
    p.add_argument("--eval-iters", type=int, metavar="N", help=f"validation batches ({defaults['eval_iters']})")
    p.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (auto)")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    p.add_argument(
        "--dtype", choices=dtypes, help="autocast dtype (auto): bf16 on CUDA, on a CPU where measured faster"
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--run-dir", help=f"checkpoints, metrics.jsonl, loss.png ({defaults['run_dir']})")
    p.add_argument("--resume", action="store_true", default=None, help="continue run-dir/last exactly")
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace a run of another recipe (data, model, starting point) in run-dir",
    )
    p.add_argument("--seed", type=_seed, help=f"seed of init, data order and samples ({defaults['seed']})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _training_fields(args: argparse.Namespace) -> dict:
    fields = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    if any(getattr(args, k) is not None for k in _BUDGETS):  # a budget given replaces the default 10 minutes
        fields.update({k: getattr(args, k) for k in _BUDGETS})
    return fields


def _exit_status(result: TrainResult) -> int:
    """0, or a stopping signal's usual status (128 + its number: 130 Ctrl-C, 143 SIGTERM), the run saved."""
    if result.stopped_by != "interrupted":
        return 0
    return 128 + int(result.stop_signal or signal.SIGINT)


def _print_summary(result: TrainResult) -> None:
    """The run's one-line summary on stdout (for scripts and redirects), except where stdout and stderr are the
    same terminal: the training log just showed that line there."""
    if result.rank != 0:
        return
    if _same_terminal(sys.stdout, sys.stderr):
        return
    print(result.summary())


def _same_terminal(a: io.TextIOBase, b: io.TextIOBase) -> bool:
    try:
        if not (a.isatty() and b.isatty()):
            return False
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (AttributeError, OSError, ValueError):  # replaced streams (tests, IDEs) without a descriptor
        return False


def _cmd_train(args: argparse.Namespace) -> int:
    from tinyllm import train

    fields = _training_fields(args)
    if args.data:
        fields["data"] = tuple(args.data)
    fields["tokenizer"] = args.tokenizer
    result = train.train(train.train_config(preset=args.preset, **fields), progress=not args.no_progress)
    _print_summary(result)
    return _exit_status(result)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from tinyllm import train

    config = train.finetune_config(init_from=args.init_from, data=args.data, **_training_fields(args))
    result = train.train(config, progress=not args.no_progress)
    _print_summary(result)
    return _exit_status(result)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from tinyllm.config import PRESETS, TrainConfig

    p = sub.add_parser("train", help="train a GPT from scratch (budgeted, resumable; DDP under torchrun)")
    p.add_argument("--preset", default="default", help=f"model shape: {', '.join(PRESETS)} (default: default)")
    p.add_argument(
        "--tokenizer",
        help="gpt2, bpe:N (an N-token BPE trained on the training split, once per corpus), or a trained "
        "tokenizer (`tinyllm tokenizer train`); default: the preset's (default: bpe:4096, others: gpt2)",
    )
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
    p.add_argument("--context", type=_positive, metavar="N", help="tokens per window (default: the model's block size)")
    p.add_argument("--stride", type=_positive, metavar="N", help="tokens between windows (default: half the context)")
    p.add_argument(
        "--max-tokens", type=_positive, metavar="N", help="score only the first N tokens of the held-out text"
    )
    p.add_argument("--batch-size", type=_positive, default=8, metavar="B", help="windows per forward pass (8)")
    p.add_argument("--seed", type=_seed, nargs="+", help="sampling seeds, one sample each (1337)")
    p.add_argument(
        "--max-new-tokens",
        type=_positive,
        metavar="N",
        help="tokens per sample (64), drawn with the server's sampling defaults (T 0.8, top-k 50, top-p 0.95, "
        "repetition penalty 1.2)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (auto)")
    report = "also write DIR/report.md with plots (with the run's loss curves when the model is a run directory)"
    p.add_argument("--report", metavar="DIR", help=report)
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _eval_kwargs(args: argparse.Namespace) -> dict:
    from tinyllm.devices import detect_device
    from tinyllm.server.settings import SamplingDefaults

    if args.report:  # before the evaluation, not after it
        try:
            Path(args.report).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--report {args.report}: cannot create that directory ({exc.strerror or exc})") from None

    # samples as the server answers /generate/custom and /generate/gpt2: its sampling defaults
    return dict(
        data=args.data, context=args.context, stride=args.stride, max_tokens=args.max_tokens,
        batch_size=args.batch_size, device=detect_device(args.device), seeds=tuple(args.seed or [1337]),
        params=SamplingDefaults().params(max_new_tokens=args.max_new_tokens or 64), progress=not args.json,
    )  # fmt: skip


def _print_results(args: argparse.Namespace, results: list, *, run_spec: str | None) -> None:
    """The results on stdout, then the report (so a report that cannot be written loses no numbers)."""
    from pathlib import Path

    from tinyllm.report import finite, text_summary, write_report

    for r in results:
        if r.eval is not None and not math.isfinite(r.eval.bits_per_byte):
            logger.warning("%s scores %s bits per byte: its weights hold NaN or inf", r.name, r.eval.bits_per_byte)
    if args.json:  # strict JSON: a broken model's NaN is null
        print(json.dumps({"models": [finite(r.to_dict()) for r in results]}, indent=2, ensure_ascii=False))
    else:
        print(text_summary(results), end="")
    if args.report:
        sys.stdout.flush()
        run_dir = None
        if run_spec and Path(run_spec).is_dir():  # a run directory, or its best/ or last/ checkpoint
            candidates = (Path(run_spec), Path(run_spec).parent)
            run_dir = next((d for d in candidates if (d / "metrics.jsonl").is_file()), None)
        report = write_report(args.report, run_dir=run_dir, results=results)
        print(f"report: {report}", file=sys.stderr if args.json else sys.stdout)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tinyllm.evaluate import load_prompts, measure_model

    prompts = load_prompts(args.prompts) if args.prompts else []
    if not prompts and (args.seed is not None or args.max_new_tokens is not None):
        logger.warning("--seed and --max-new-tokens shape the samples, and there are none without --prompts FILE")
    result = measure_model("model", args.model, prompts=prompts, **_eval_kwargs(args))
    _print_results(args, [result], run_spec=args.model)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tinyllm.checkpoint import find_checkpoint
    from tinyllm.evaluate import DEFAULT_PROMPTS, compare_models, load_prompts

    custom = args.custom
    if custom is None and find_checkpoint("runs/default") is not None:
        custom = "runs/default"
    gpt2 = None if args.gpt2 == "none" else args.gpt2
    if custom is None and gpt2 is None:
        raise UserError("nothing to compare: give --custom MODEL (or train runs/default first), or a GPT-2 with --gpt2")
    if custom is None:
        logger.warning("no --custom model and no runs/default checkpoint: showing GPT-2 alone")
    prompts = load_prompts(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    results = compare_models(custom=custom, gpt2=gpt2, prompts=prompts, **_eval_kwargs(args))
    if all(r.unavailable for r in results):  # GPT-2 alone, and it could not load: nothing was compared
        raise UserError(f"nothing to compare: GPT-2 is unavailable ({results[0].unavailable}) and there is no --custom")
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
    t.add_argument("--seed", type=_seed, default=1337, help="seed of the train/validation split (1337)")
    t.set_defaults(func=_cmd_tokenizer_train)


# --- run (make run) --------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from tinyllm.checkpoint import find_checkpoint, restore_set_aside
    from tinyllm.server import ServerSettings, serve

    run_dir = Path(args.run_dir)
    settings = ServerSettings.from_env(host=args.host, port=args.port, checkpoint=str(run_dir))  # checked first
    if (wanted := os.environ.get("TINYLLM_CHECKPOINT", "").strip()) and Path(wanted) != run_dir:
        logger.warning("TINYLLM_CHECKPOINT=%s is for `tinyllm serve`; `tinyllm run` serves --run-dir %s",
                       wanted, run_dir)  # fmt: skip
    from tinyllm.train import TrainError, run_dir_lock

    try:
        with run_dir_lock(run_dir):  # not while a run trains there
            if restore_set_aside(run_dir):
                logger.warning("%s: moved back the run a rerun had set aside in previous/ (it left none)", run_dir)
    except TrainError as exc:  # in use: serve what is there (a training run elsewhere cannot be waited for)
        logger.warning("%s", exc)
    checkpoint = find_checkpoint(run_dir)
    if checkpoint is None:
        from tinyllm.train import train_default

        minutes = f"{args.minutes:g} minute{'s' * (args.minutes != 1)}"
        logger.info("no checkpoint in %s: training the default model for %s", run_dir, minutes)
        result = train_default(minutes=args.minutes, run_dir=run_dir)
        if result.stopped_by == "interrupted":  # stopped by Ctrl-C / SIGTERM: don't serve a half-trained model
            logger.warning("training stopped early: `tinyllm train --run-dir %s --resume` finishes it", run_dir)
            return 130
        checkpoint = find_checkpoint(run_dir)
    else:
        logger.info("serving the existing checkpoint %s (delete %s to train again)", checkpoint, run_dir)
    serve(settings)
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train the default model if none exists, then serve it (what `make run` does)")
    p.add_argument("--run-dir", default="runs/default", help="where the default model lives (default runs/default)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget when no checkpoint exists (10)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, or $TINYLLM_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 5000, or $TINYLLM_PORT)")
    p.set_defaults(func=_cmd_run)


# --- generate -----------------------------------------------------------------------------------


def _generate_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling options; a bad value names its option ("--top-p must be in (0, 1]"), before the model loads."""
    from tinyllm.sampling import SamplingError, SamplingParams

    try:
        return SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            stop=tuple(args.stop or ()),
            ignore_eos=args.ignore_eos,
        )
    except SamplingError as exc:  # "top_p must be ..." from the option it came from: "--top-p must be ..."
        field, _, rest = str(exc).partition(" ")
        raise UserError(f"--{field.replace('_', '-')} {rest}" if field.isidentifier() else str(exc)) from None


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    from tinyllm.checkpoint import resolve_model, tokenizer_from_meta
    from tinyllm.devices import detect_device
    from tinyllm.engine import generate, prepare_for_inference, stream

    params = _generate_params(args)

    # auto: as the server's (MPS only on request: decoding is untested there)
    model, meta = resolve_model(args.model, device=detect_device(args.device, prefer=("cuda",)))
    prepare_for_inference(model, dtype=args.dtype, quantize=args.quantize)
    tok = tokenizer_from_meta(meta, model)
    prompt = tok.encode(args.prompt) or [tok.eot_token]  # an empty prompt starts from end-of-text, as GPT-2 does
    options = dict(eos_token_id=tok.eot_token, tokenizer=tok, truncate=True, compile=args.compile)
    start = time.perf_counter()
    if args.stream:
        sys.stdout.write(args.prompt)
        for event in stream(model, prompt, params, **options):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = event.result
        sys.stdout.write("\n")
    else:
        (result,) = generate(model, [prompt], params, **options)
        print(args.prompt + (result.text or ""))
    elapsed = time.perf_counter() - start
    if result.finish_reason == "length" and result.completion_tokens < params.max_new_tokens:
        logger.warning(
            "stopped after %d of --max-new-tokens %d: the prompt and the text fill the model's context (%d tokens)",
            result.completion_tokens,
            params.max_new_tokens,
            model.config.block_size,
        )
    logger.info(
        "%d prompt + %d new tokens in %.2f s (%.1f tokens/s), finish reason: %s%s",
        result.prompt_tokens,
        result.completion_tokens,
        elapsed,
        result.completion_tokens / elapsed,
        result.finish_reason,
        f" (prompt cut by {result.prompt_truncated} tokens to fit the context)" if result.prompt_truncated else "",
    )
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from tinyllm.sampling import SamplingParams
    from tinyllm.server.settings import SamplingDefaults

    d = SamplingDefaults()  # the seed routes' defaults: same prompt and seed, same text as /generate/custom
    penalties = SamplingParams()
    p = sub.add_parser("generate", help="generate text from a prompt with a checkpoint or GPT-2")
    p.add_argument("--model", required=True, help="a checkpoint or run directory, gpt2, a hub id or a HF GPT-2 dir")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"({d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy ({d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off ({d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off ({d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"0 = off ({d.min_p})")
    p.add_argument(
        "--repetition-penalty", type=float, default=d.repetition_penalty, help=f"1 = off ({d.repetition_penalty})"
    )
    p.add_argument("--presence-penalty", type=float, default=penalties.presence_penalty, help="-2..2 (0.0)")
    p.add_argument("--frequency-penalty", type=float, default=penalties.frequency_penalty, help="-2..2 (0.0)")
    p.add_argument("--seed", type=_seed, default=None, help="same seed, same text (default: random)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights (float32: exact)")
    p.add_argument(
        "--quantize",
        choices=["int8", "int8-dynamic"],
        default=None,
        help="int8 weights (lossy); int8-dynamic: int8 activations too (eager only)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="build a faster batch-1 decode step first (CPU): for float32 a C kernel (system C compiler, about a "
        "second the first time), for bfloat16/int8 torch.compile (a C++ compiler, seconds to a minute the first time)",
    )
    p.set_defaults(func=_cmd_generate)


# --- serve --------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from tinyllm.server import ServerSettings, serve

    overrides: dict = {"host": args.host, "port": args.port}  # None: from $TINYLLM_* or the default
    from tinyllm.server.settings import optional_source  # "none"/"off" as the environment variables take them

    if args.checkpoint is not None:
        overrides["checkpoint"] = optional_source(args.checkpoint)
    if args.no_gpt2:
        overrides["gpt2"] = None
    elif args.gpt2 is not None:
        overrides["gpt2"] = optional_source(args.gpt2)
    if args.api_key is not None:
        overrides["api_key"] = args.api_key
    if args.no_compile:
        overrides["compile"] = False
    overrides["device"] = args.device
    serve(ServerSettings.from_env(**overrides))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve your checkpoint next to GPT-2: seed routes, OpenAI-compatible API, page")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1, or $TINYLLM_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default 5000, or $TINYLLM_PORT)")
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="DIR",
        help="checkpoint or run directory (default runs/default); none: serve GPT-2 only",
    )
    gpt2 = p.add_mutually_exclusive_group()
    gpt2.add_argument(
        "--gpt2",
        default=None,
        metavar="SOURCE",
        help="GPT-2 hub id or local directory (default openai-community/gpt2, or $TINYLLM_GPT2); off: none",
    )
    gpt2.add_argument("--no-gpt2", action="store_true", help="serve without GPT-2")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (prefer $TINYLLM_API_KEY)")
    p.add_argument(
        "--device",
        default=None,
        help="auto (a CUDA GPU if any, else cpu), cpu, cuda, cuda:N or mps (default auto, or $TINYLLM_DEVICE)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="keep decoding eager (default: build the batch-1 decode step in the background, or $TINYLLM_COMPILE)",
    )
    p.set_defaults(func=_cmd_serve)


# --- parser -------------------------------------------------------------------------------------

# Each entry adds one subcommand; modules that own a subcommand add theirs here.
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_run,
    _add_fetch_assets,
    _add_tokenize,
    _add_prepare,
    _add_tokenizer,
    _add_export,
    _add_train,
    _add_finetune,
    _add_evaluate,
    _add_compare,
    _add_generate,
    _add_serve,
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
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints as \xff, not a traceback
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    from tinyllm import logs

    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except TinyLLMError as exc:
        print(f"tinyllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    except OSError as exc:  # the machine's doing (a home that cannot be created, a full disk): one line, no trace
        print(f"tinyllm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
