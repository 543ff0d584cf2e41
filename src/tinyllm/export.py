"""Export a checkpoint as a Hugging Face GPT-2 directory that transformers, vLLM, TGI and llama.cpp read.

The directory holds `config.json` (GPT2LMHeadModel), `model.safetensors`, `generation_config.json` and the
GPT-2 tokenizer as `vocab.json` + `merges.txt` (+ `tokenizer_config.json`, `special_tokens_map.json`).
The tokenizer files are rebuilt from tiktoken's ranks: a token of rank r is BPE-encoded with the ranks
below r; it always ends in exactly two pieces, and those two are its merge. Bytes are spelled in GPT-2's
byte-to-unicode alphabet. The rebuilt files match OpenAI's originals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from tinyllm.checkpoint import atomic_directory, load_checkpoint
from tinyllm.errors import TinyLLMError
from tinyllm.gpt2 import hf_config_dict, to_hf_state_dict
from tinyllm.tokenizer import Tokenizer, bytes_to_unicode, get_tokenizer

logger = logging.getLogger(__name__)

EOT_TEXT = "<|endoftext|>"


class ExportError(TinyLLMError):
    """A checkpoint cannot be exported (unknown tokenizer, vocabulary too small, bad output path)."""


def _token_merge(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes]:
    """The two pieces token `rank` was merged from: BPE its bytes using only ranks below `rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ExportError(f"token {rank} ({token!r}) is not a merge of two lower-ranked tokens; the ranks are not BPE")
    return parts[0], parts[1]


def gpt2_vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`vocab.json` (token text -> id) and the merges, in rank order, from BPE ranks (bytes -> rank)."""
    alphabet = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[spell(token)] = rank
        if len(token) > 1:
            left, right = _token_merge(token, rank, ranks)
            merges.append((spell(left), spell(right)))
    return vocab, merges


def write_gpt2_tokenizer(out_dir: Path, *, model_max_length: int, tokenizer: Tokenizer | None = None) -> None:
    """Write a byte-level BPE tokenizer (GPT-2's by default) as GPT-2 tokenizer files into `out_dir`."""
    encoding = (tokenizer or get_tokenizer("gpt2")).encoding
    eot = encoding.eot_token
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(eot)}
    vocab, merges = gpt2_vocab_and_merges(ranks)
    vocab[EOT_TEXT] = eot
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "model_max_length": model_max_length,
        # text that spells "<|endoftext|>" stays text, as tinyllm (and tiktoken's encode_ordinary) reads it:
        # transformers, vLLM and TGI then see the token ids tinyllm trained and scored
        "split_special_tokens": True,
        **special,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_EXPORT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
}


def _replaceable(path: Path) -> bool:
    """An earlier export may be replaced: a directory holding only files an export writes. Anything else (a
    README, a .git, optimizer files beside a downloaded GPT-2) would be lost, so it is refused."""
    return all(p.name in _EXPORT_FILES for p in path.iterdir())


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint at `checkpoint_dir` as a Hugging Face GPT-2 directory `out_dir` (atomically).

    An existing `out_dir` is replaced only if it is empty or an earlier GPT-2 export.

    Raises:
        CheckpointError: the checkpoint does not load.
        ExportError: its tokenizer is not GPT-2's, its vocabulary is smaller than the tokenizer's, or `out_dir`
            cannot be written.
    """
    ckpt = load_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    if out.expanduser().absolute() == ckpt.path.expanduser().absolute():
        raise ExportError("the export directory must differ from the checkpoint directory")
    tokenizer = ckpt.tokenizer()
    if ckpt.config.vocab_size < tokenizer.vocab_size:
        raise ExportError(
            f"{ckpt.path} has vocab_size {ckpt.config.vocab_size}, fewer than its tokenizer's {tokenizer.vocab_size}"
        )
    state = to_hf_state_dict(ckpt.model)
    del state["lm_head.weight"]  # tied to wte; transformers ties it again (safetensors refuses shared tensors)
    dtype = ckpt.model.transformer.wte.weight.dtype
    try:
        with atomic_directory(out, may_replace=_replaceable) as tmp:
            weights = {k: v.contiguous() for k, v in state.items()}
            save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
            eot = tokenizer.eot_token  # not the vocabulary's last row: a padded vocabulary (4160 rows) ends past it
            _write_json(tmp / "config.json", hf_config_dict(ckpt.config, dtype=dtype, eot=eot))
            _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
            write_gpt2_tokenizer(tmp, model_max_length=ckpt.config.block_size, tokenizer=tokenizer)
    except OSError as exc:  # read-only or full disk, no permission: one line, not the staging directory's name
        raise ExportError(f"cannot write {out} ({exc.strerror or exc})") from None
    logger.info("exported %s to %s", ckpt.path, out)
    return out
