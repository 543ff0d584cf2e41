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

    data = prepare(args.paths or None, val_fraction=args.val_fraction, seed=args.seed)
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


# --- parser -------------------------------------------------------------------------------------

# Each entry adds one subcommand; modules that own a subcommand add theirs here.
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_fetch_assets,
    _add_tokenize,
    _add_prepare,
    _add_export,
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
