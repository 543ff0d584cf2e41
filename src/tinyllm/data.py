"""Text -> uint16 token shards (memmap) + meta.json, cached by content hash; a seeded batch sampler.

`prepare` streams the corpus file by file in chunks, tokenizes on every core (tiktoken's threads) and
appends to `train.bin` / `val.bin`; a document ends with the end-of-text token. The cache key hashes the
tokenizer, the split settings and every file's bytes, so a second run reuses the shards and a changed file
invalidates them. The cache directory is written under a temporary name and renamed into place, so an
interrupted run never leaves a half-written cache; a run that fails removes its staging directory, and one
that was killed leaves it to the next build, which removes it once it is stale (`_remove_stale_staging`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from tinyllm import __version__, assets
from tinyllm.corpus import (
    CorpusError,
    SourceFile,
    Split,
    iter_document_ids,
    iter_documents,
    make_split,
    resolve_sources,
)
from tinyllm.tokenizer import (
    TOKENIZER_JSON,
    Tokenizer,
    get_tokenizer,
    save_tokenizer,
    train_bpe,
    trained_tokenizers_dir,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 18  # pieces handed to tiktoken's threads
IN_FLIGHT = 24  # pieces queued or being encoded at once (~6M characters)
# The first characters are encoded on the calling thread before the pool's threads start: measured, two
# tiktoken threads that start cold together run slowly and erratically for the whole job (100 MB in 7-10 s
# instead of 4.5 s in a fresh process; BENCHMARKS.md, "Data preparation").
WARM_UP_CHARS = 1 << 21
WRITE_TOKENS = 1 << 22  # tokens buffered per split before a write
# A newline between two non-space characters is a pre-token of its own in the GPT-2 pattern (whitespace
# runs are the only pre-tokens that hold a newline), so splitting after it tokenizes exactly as the whole text
# would. (After "\n\n" it would not: a piece ending in "\n\n" makes one pre-token of both.)
_SAFE_BREAK = re.compile(r"(?<=\S)\n(?=\S)")
_WORD_BREAK = re.compile(r"\s(?=\S)")
# JSON's escapes of a carriage return ("\r", "\u000d"): JSONL texts' CR LF are read as LF since (see `_content_key`)
_JSONL_CR = re.compile(rb"\\(?:r|u000[dD])")
# A build stages its shards in `.<key>-<pid>@<host>-<random>` beside the cache (tempfile.mkdtemp's random part
# has no "-"); a process killed mid-build (SIGTERM, SIGKILL, power loss) leaves its staging directory behind.
_STAGING = re.compile(r"\.[0-9a-f]{32}-(?:(?P<pid>\d+)@(?P<host>[\w.-]*)-)?[a-z0-9_]+")
STALE_STAGING_SECONDS = 24 * 3600
DEAD_OWNER_IDLE_SECONDS = 600  # a staging directory whose process is gone, untouched this long, is stale


@dataclass(frozen=True)
class PreparedData:
    """A prepared corpus on disk: `train.bin`, `val.bin` (uint16 tokens) and `meta.json`."""

    dir: Path
    meta: dict[str, Any]

    def tokens(self, split: str) -> np.ndarray:
        """The token stream of a split as a read-only uint16 memmap (empty array when the split is empty)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose train or val")
        if self.meta["splits"][split]["tokens"] == 0:
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(self.dir / f"{split}.bin", dtype=np.uint16, mode="r")

    def num_tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text behind a split: the denominator of bits per byte."""
        return int(self.meta["splits"][split]["bytes"])

    @classmethod
    def load(cls, path: str | Path) -> PreparedData:
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorpusError(f"{path}: not a prepared data directory ({exc}); run `tinyllm prepare`") from None
        return cls(path, meta)


def data_cache_dir() -> Path:
    return assets.tinyllm_home() / "data"


def _content_key(
    files: Sequence[SourceFile], *, tokenizer: str, val_fraction: float, seed: int, val_threshold: int | None = None
) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([FORMAT_VERSION, tokenizer, val_fraction, seed]).encode())
    if val_threshold is not None:  # a recorded split: other shards than val_fraction's (whose keys stay as they were)
        digest.update(f"val_threshold: {val_threshold}".encode())
    carriage_returns = jsonl_carriage_returns = False
    for f in files:
        digest.update(f.doc_id.encode("utf-8", "surrogateescape") + b"\0")
        tail = b""  # an escape cut between two blocks
        try:
            with open(f.path, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(block)
                    if f.is_jsonl:
                        jsonl_carriage_returns = jsonl_carriage_returns or bool(_JSONL_CR.search(tail + block))
                        tail = block[-5:]
                    else:
                        carriage_returns = carriage_returns or b"\r" in block
        except OSError as exc:
            raise CorpusError(f"{f.path}: cannot read ({exc.strerror}); check permissions") from None
        digest.update(b"\0")
    if carriage_returns:  # text files' CR LF are read as LF since: shards cached before kept the CRs
        digest.update(b"newlines: LF")
    if jsonl_carriage_returns:  # and JSONL texts' since later
        digest.update(b"jsonl newlines: LF")
    return digest.hexdigest()


def _pieces(text: str) -> Iterator[str]:
    """Cut text into ~CHUNK_CHARS pieces at safe pre-token boundaries."""
    start = 0
    while len(text) - start > CHUNK_CHARS:
        match = _SAFE_BREAK.search(text, start + CHUNK_CHARS)
        if match is None:
            break
        yield text[start : match.start() + 1]
        start = match.start() + 1
    yield text[start:]


class _SplitWriter:
    """Appends token arrays to one split's .bin file and counts documents, bytes and tokens."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close(), after fsync)
        self.documents = self.bytes = self.tokens = 0
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def write(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.tokens += len(ids)
        if self.pending_tokens >= WRITE_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.file.write(np.concatenate(self.pending).astype(np.uint16).tobytes())
            self.pending, self.pending_tokens = [], 0

    def close(self) -> None:
        self.flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class _Pipeline:
    """Pieces of text go to the pool's threads as soon as they are read; results are written in order.

    At most `IN_FLIGHT` pieces wait or run at a time, so memory stays bounded while reading the next files
    overlaps with encoding: every core keeps tokenizing instead of waiting for a batch to fill and drain.
    """

    def __init__(self, tok: Tokenizer, writers: dict[str, _SplitWriter], pool: concurrent.futures.Executor) -> None:
        self.tok, self.writers, self.pool = tok, writers, pool
        self.eot = np.array([tok.eot_token], dtype=np.uint32)
        self.in_flight: collections.deque[tuple[str, concurrent.futures.Future[np.ndarray], bool]] = collections.deque()
        self.warm_up_chars = WARM_UP_CHARS

    def add(self, name: str, text: str) -> None:
        """Queue one document of split `name`; it ends with end-of-text."""
        pieces = list(_pieces(text))
        for i, piece in enumerate(pieces):
            while len(self.in_flight) >= IN_FLIGHT:
                self._drain_one()
            if self.warm_up_chars > 0:
                self.warm_up_chars -= len(piece)
                future: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
                future.set_result(self.tok.encode_to_numpy(piece))
            else:
                future = self.pool.submit(self.tok.encode_to_numpy, piece)
            self.in_flight.append((name, future, i == len(pieces) - 1))

    def _drain_one(self) -> None:
        name, future, last = self.in_flight.popleft()
        self.writers[name].write(future.result())
        if last:
            self.writers[name].write(self.eot)

    def finish(self) -> None:
        while self.in_flight:
            self._drain_one()


def prepare(
    sources: Sequence[str | Path] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 1337,
    tokenizer: str | Tokenizer = "gpt2",
    cache_dir: str | Path | None = None,
    num_threads: int | None = None,
    min_tokens: int = 0,
    progress: bool = True,
    val_threshold: int | None = None,
) -> PreparedData:
    """Tokenize a corpus (None: the built-in one) into cached shards and return them.

    Args:
        sources: files, folders, globs or "shakespeare".
        val_fraction: share of documents held out (by whole document; seeded).
        seed: the split's seed.
        tokenizer: "gpt2", a trained tokenizer's name or directory, or "bpe:N" (see `tokenizer_for`).
        cache_dir: where prepared corpora live (default: `$TINYLLM_HOME/data`).
        num_threads: tokenizer threads (default: every core).
        min_tokens: fail clearly if the training split has fewer tokens (e.g. one context window + 1).
        progress: show a progress bar.
        val_threshold: hold out the documents an earlier split held out (its meta's `val_threshold`) instead of
            `val_fraction` of them: after documents were added, the same held-out documents.
    """
    files = resolve_sources(sources)
    tok = tokenizer_for(tokenizer, sources, val_fraction=val_fraction, seed=seed)
    if tok.vocab_size > 65536:
        raise CorpusError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens; uint16 shards hold at most 65536")
    key = _content_key(files, tokenizer=tok.name, val_fraction=val_fraction, seed=seed, val_threshold=val_threshold)
    root = Path(cache_dir) if cache_dir else data_cache_dir()
    target = root / key
    if (target / "meta.json").exists():
        logger.info("reusing prepared data %s", target)
        data = PreparedData.load(target)
    else:
        data = _build(files, target, tok=tok, val_fraction=val_fraction, seed=seed, key=key,
                      num_threads=num_threads or os.cpu_count() or 1, progress=progress,
                      val_threshold=val_threshold)  # fmt: skip
    if data.num_tokens("train") < min_tokens:
        raise CorpusError(
            f"the training split has {data.num_tokens('train')} tokens, fewer than the {min_tokens} one context "
            "window needs; add more text or use a smaller --block-size"
        )
    return data


def _assign(doc_id: str, text: str, split: Split, val_fraction: float) -> list[tuple[str, str]]:
    """Which split(s) a document goes to. A corpus of one document is held out by position instead:
    its last `val_fraction` becomes the validation text, cut at a line break, else (a text without one after
    that point) between words, else where it falls."""
    if split.num_documents == 1 and val_fraction > 0:
        at = int(len(text) * (1 - val_fraction))
        cut = _SAFE_BREAK.search(text, at) or _WORD_BREAK.search(text, at)
        end = cut.start() + 1 if cut is not None else at
        if 0 < end < len(text):
            return [("train", text[:end]), ("val", text[end:])]
    return [("val" if split.is_val(doc_id) else "train", text)]


def _build(
    files: Sequence[SourceFile],
    target: Path,
    *,
    tok: Tokenizer,
    val_fraction: float,
    seed: int,
    key: str,
    num_threads: int,
    progress: bool,
    val_threshold: int | None = None,
) -> PreparedData:
    started = time.perf_counter()
    ids = (d for f in files for d in iter_document_ids(f))
    split = make_split(ids, val_fraction=val_fraction, seed=seed, threshold=val_threshold)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-{os.getpid()}@{_host()}-", dir=target.parent))
    writers: dict[str, _SplitWriter] = {}
    try:
        for name in SPLITS:
            writers[name] = _SplitWriter(staging / f"{name}.bin")
        total = sum(f.path.stat().st_size for f in files)
        with (
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress or None) as bar,
            concurrent.futures.ThreadPoolExecutor(num_threads) as pool,
        ):
            pipeline = _Pipeline(tok, writers, pool)
            try:
                for f in files:
                    for doc in iter_documents(f):
                        for name, text in _assign(doc.id, doc.text, split, val_fraction):
                            writers[name].documents += 1
                            writers[name].bytes += len(text.encode("utf-8"))
                            pipeline.add(name, text)
                    bar.update(f.path.stat().st_size)
                pipeline.finish()
            except BaseException:
                for _, future, _ in pipeline.in_flight:
                    future.cancel()
                raise
        for w in writers.values():
            w.close()
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.name,
            "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token,
            "dtype": "uint16",
            "seed": seed,
            "val_fraction": val_fraction,
            "content_hash": key,
            "val_threshold": split.threshold,  # which documents are held out (see `make_split`)
            "documents": split.num_documents,
            "sources": sorted({f.source or str(f.path) for f in files}),
            "files": len(files),
            "splits": {
                name: {"documents": w.documents, "bytes": w.bytes, "tokens": w.tokens} for name, w in writers.items()
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 3),
            "tinyllm_version": __version__,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished the same corpus first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:  # an error or Ctrl-C: no staging directory left behind (open files closed first, for Windows)
        for w in writers.values():
            w.file.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("prepared %s in %.1fs", target, time.perf_counter() - started)
    return PreparedData.load(target)


def _host() -> str:
    """This machine's name as it can stand in a file name (a shared cache may be written from several)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]


def _pid_running(pid: int) -> bool:
    if os.name != "posix":  # Windows' os.kill(pid, 0) would end the process: count it as running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError): it runs
        return True
    return True


def _remove_stale_staging(root: Path) -> None:
    """Remove the staging directories that builds killed mid-way left in `root`; never one still in use.

    A staging directory is stale when its name records a process of this machine that no longer runs and
    nothing in it was written for `DEAD_OWNER_IDLE_SECONDS` (ten minutes: a container sharing this host name and
    the cache sees other process ids, so a live build elsewhere may look dead here), or when nothing in it was
    written for `STALE_STAGING_SECONDS` (a day). The second rule covers what the first cannot check: another
    machine's directory in a shared cache, one named before names recorded their process, one whose process id
    a later process took (a container's processes often reuse the same few). A running build writes its shards
    every few seconds, so only a build stopped (not killed) for that long could lose its directory.
    """
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = _STAGING.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        dead_owner = bool(match["pid"]) and match["host"] == _host() and not _pid_running(int(match["pid"]))
        try:
            times = [entry.stat(follow_symlinks=False).st_mtime, *(c.stat().st_mtime for c in os.scandir(entry))]
        except OSError:  # removed meanwhile (its build finished or failed)
            continue
        idle = now - max(times)
        if idle > (DEAD_OWNER_IDLE_SECONDS if dead_owner else STALE_STAGING_SECONDS):
            logger.info("removing %s, left by an interrupted build", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


def train_tokenizer(
    sources: Sequence[str | Path] | None = None,
    *,
    vocab_size: int,
    val_fraction: float = 0.1,
    seed: int = 1337,
) -> Tokenizer:
    """Train a byte-level BPE on the training split of a corpus and cache it under its name.

    Only training documents are seen, so the held-out text stays unseen by the tokenizer too. Training
    is deterministic: the same corpus, split and size give the same tokenizer (and name), reused from
    `$TINYLLM_HOME/tokenizers` on later calls.
    """
    files = resolve_sources(sources)
    split = make_split((d for f in files for d in iter_document_ids(f)), val_fraction=val_fraction, seed=seed)

    def train_texts() -> Iterator[str]:
        for f in files:
            for doc in iter_documents(f):
                for name, text in _assign(doc.id, doc.text, split, val_fraction):
                    if name == "train":
                        yield text

    tok = train_bpe(train_texts(), vocab_size=vocab_size)
    target = trained_tokenizers_dir() / tok.name
    if not (target / TOKENIZER_JSON).exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{tok.name}-", dir=_mkdir(trained_tokenizers_dir())))
        try:
            save_tokenizer(tok, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.replace(staging, target)
        except OSError:  # another process saved the same tokenizer first
            shutil.rmtree(staging, ignore_errors=True)
    return tok


TRAINED_SPEC = re.compile(r"bpe:(\d+)")


def tokenizer_for(
    spec: str | Tokenizer,
    sources: Sequence[str | Path] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 1337,
) -> Tokenizer:
    """The tokenizer `spec` names; "bpe:N" is an N-token BPE trained on this corpus's training split.

    A "bpe:N" tokenizer is trained once per corpus content, split and size (`train_tokenizer`) and found
    again through a small index under `$TINYLLM_HOME/tokenizers/recipes`, so later runs skip the training.
    Anything else goes to `get_tokenizer` ("gpt2", a trained tokenizer's name or directory).
    """
    if isinstance(spec, Tokenizer):
        return spec
    match = TRAINED_SPEC.fullmatch(spec)
    if match is None:
        return get_tokenizer(spec)
    files = resolve_sources(sources)
    key = _content_key(files, tokenizer=spec, val_fraction=val_fraction, seed=seed)
    index = trained_tokenizers_dir() / "recipes" / key
    if index.is_file():
        name = index.read_text().strip()
        if (trained_tokenizers_dir() / name / TOKENIZER_JSON).exists():
            return get_tokenizer(name)
    started = time.perf_counter()
    tok = train_tokenizer(sources, vocab_size=int(match[1]), val_fraction=val_fraction, seed=seed)
    logger.info("trained tokenizer %s (%s) in %.1fs", tok.name, spec, time.perf_counter() - started)
    staging = _mkdir(index.parent) / f".{key}.{os.getpid()}"
    staging.write_text(tok.name + "\n")
    os.replace(staging, index)
    return tok


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class BatchSampler:
    """Random (B, T) input/target windows from a token stream, seeded and resumable.

    Each distributed rank draws from its own stream (seed + rank), so ranks see different batches.
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int = 0, rank: int = 0) -> None:
        if batch_size < 1 or block_size < 1:
            raise ValueError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        if len(tokens) < block_size + 1:
            raise CorpusError(
                f"the token stream has {len(tokens)} tokens, fewer than one context window of {block_size} + 1; "
                "add more text or use a smaller block size"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed + rank
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.batches_drawn = 0

    def next_batch(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y, both (B, T) int64; y is x shifted by one token."""
        T = self.block_size
        starts = self.rng.integers(0, len(self.tokens) - T, size=self.batch_size)
        windows = np.stack([np.asarray(self.tokens[s : s + T + 1], dtype=np.int64) for s in starts])  # (B, T+1)
        batch = torch.from_numpy(windows)
        self.batches_drawn += 1
        device = torch.device(device)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        else:
            batch = batch.to(device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream, for exact resume."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.batches_drawn = state["batches_drawn"]
        self.rng.bit_generator.state = state["rng"]
