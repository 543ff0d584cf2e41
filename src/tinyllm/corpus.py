"""Where text comes from: the built-in corpus or the user's files, folders, globs and JSONL.

A corpus is a list of sources resolved to files; each file yields documents lazily (a `.txt`/`.md` file is
one document, each line of a `.jsonl` file with a `text` field is one), so memory does not grow with
corpus size. The train/validation split is by whole document, seeded and deterministic: a document's
side depends only on the seed and its stable id (its path relative to the source it came from, plus the
line for JSONL; files that would share an id, such as two `notes.txt` from different folders, are told
apart by their paths below their common folder), never on the machine or the order of discovery.
Folders are searched recursively, skipping hidden files and folders (`.git`, `.ipynb_checkpoints`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyllm.errors import TinyLLMError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
BUILTIN = "shakespeare"


class CorpusError(TinyLLMError):
    """A source cannot be read as text: the message names the file and what to do."""


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus, with the stable id prefix its documents carry."""

    path: Path
    doc_id: str  # stable across machines: the path relative to the source argument it came from

    @property
    def is_jsonl(self) -> bool:
        return self.path.suffix.lower() in JSONL_SUFFIXES


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def absolute_sources(sources: Sequence[str | Path]) -> tuple[str, ...]:
    """Sources as they mean the same from any directory (a run records them): paths and globs made absolute,
    the built-in corpus kept by name."""
    return tuple(str(s) if str(s) == BUILTIN else os.path.abspath(os.path.expanduser(str(s))) for s in sources)


def resolve_sources(sources: Sequence[str | Path] | None) -> list[SourceFile]:
    """Expand paths, folders and globs into a sorted list of files; None or "shakespeare" is the built-in corpus."""
    if not sources:
        sources = [BUILTIN]
    files: list[SourceFile] = []
    for source in sources:
        text = str(source)
        if text == BUILTIN:
            from tinyllm import assets

            root = assets.fetch_shakespeare()
            files += [SourceFile(p, f"{BUILTIN}/{p.name}") for p in sorted(root.glob("*.txt"))]
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise CorpusError(f"{path}: folder has no .txt, .md or .jsonl files; add some or pass files directly")
            files += [SourceFile(p, f"{path.name}/{p.relative_to(path).as_posix()}") for p in found]
        elif path.is_file():
            files.append(SourceFile(path, path.name))
        elif any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise CorpusError(f"{text}: pattern matches no files; check the pattern")
            files += [SourceFile(p, p.name) for p in matches]
        else:
            raise CorpusError(f"{text}: no such file or folder; pass text files, folders, globs or 'shakespeare'")
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.path.resolve() not in seen:
            seen.add(f.path.resolve())
            unique.append(f)
    return _distinct_ids(unique)


def _distinct_ids(files: list[SourceFile]) -> list[SourceFile]:
    """Files whose ids coincide (same name from different folders) get their paths below their common folder:
    one id for two files would put both on the same side of the split."""
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        groups.setdefault(f.doc_id, []).append(i)
    out = list(files)
    for same in groups.values():
        if len(same) < 2:
            continue
        paths = [files[i].path.resolve() for i in same]
        common = Path(os.path.commonpath(paths))
        for i, path in zip(same, paths, strict=True):
            out[i] = SourceFile(files[i].path, path.relative_to(common).as_posix())
    ids = [f.doc_id for f in out]
    if len(set(ids)) < len(ids):  # a renamed id met another file's: the absolute paths are distinct
        out = [SourceFile(f.path, f.path.resolve().as_posix()) if ids.count(f.doc_id) > 1 else f for f in out]
    return out


def _decode(path: Path, raw: bytes) -> str:
    if not raw.strip():
        raise CorpusError(f"{path}: file is empty; remove it or add text")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) and b"\x00" in raw[:8192]:  # UTF-16 (Notepad's "Unicode")
        raise CorpusError(f"{path}: is UTF-16 text; convert it to UTF-8 (e.g. `iconv -f utf-16 -t utf-8`)")
    if b"\x00" in raw[:8192]:
        raise CorpusError(f"{path}: looks like a binary file (NUL bytes); pass UTF-8 text files only")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: invalid UTF-8 at byte {exc.start}; convert it to UTF-8 (e.g. `iconv -t utf-8`)"
        ) from None
    # Windows' CR LF (and old Macs' CR) read as LF, as Python's text files do: the model learns one newline
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def iter_documents(source: SourceFile) -> Iterator[Document]:
    """The documents of one file, read lazily (JSONL line by line)."""
    path = source.path
    try:
        if not source.is_jsonl:
            yield Document(source.doc_id, _decode(path, path.read_bytes()))
            return
        with open(path, "rb") as f:
            any_doc = False
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:  # a byte-order mark (Windows tools write one) may open the file
                    record = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise CorpusError(
                        f"{path}:{lineno}: not valid JSON ({exc}); each line must be a JSON object"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CorpusError(f'{path}:{lineno}: line has no "text" string field; write {{"text": "..."}}')
                try:
                    record["text"].encode("utf-8")
                except UnicodeEncodeError as exc:  # a \ud800-style escape: valid JSON, not Unicode text
                    raise CorpusError(
                        f"{path}:{lineno}: the text holds a lone surrogate escape at character {exc.start}, "
                        "which is not valid Unicode; fix or remove the line"
                    ) from None
                if record["text"].strip():
                    any_doc = True
                    yield Document(f"{source.doc_id}:{lineno}", record["text"])
            if not any_doc:
                raise CorpusError(f'{path}: no non-empty documents; add lines like {{"text": "..."}}')
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror}); check permissions") from None


def iter_document_ids(source: SourceFile) -> Iterator[str]:
    """Document ids of one file without keeping texts (for the split's first pass).

    A text file is one document, so only JSONL files are read here.
    """
    if not source.is_jsonl:
        yield source.doc_id
        return
    for doc in iter_documents(source):
        yield doc.id


def doc_hash(doc_id: str, seed: int) -> int:
    """A uniform 64-bit hash of a document id under a seed: the split's only source of randomness."""
    key = f"{seed}:{doc_id}".encode("utf-8", "surrogateescape")  # a file name need not be UTF-8
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Split:
    """Which documents are held out: those whose hash is at most `threshold`."""

    seed: int
    threshold: int
    num_documents: int
    num_val: int

    def is_val(self, doc_id: str) -> bool:
        return doc_hash(doc_id, self.seed) <= self.threshold


def make_split(doc_ids: Iterable[str], *, val_fraction: float, seed: int, threshold: int | None = None) -> Split:
    """Hold out round(val_fraction * N) documents (at least one when N >= 2), chosen by seeded hash.

    `threshold` holds out instead the documents whose hash is at most it: an earlier split's (`Split.threshold`),
    which keeps its held-out documents held out, and its training documents in training, after the corpus grew.
    Only the 8-byte hashes are kept, so a corpus of millions of documents splits in bounded memory.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction}")
    hashes = np.fromiter((doc_hash(d, seed) for d in doc_ids), dtype=np.uint64)
    n = len(hashes)
    if threshold is not None:
        num_val = int(np.count_nonzero(hashes <= np.uint64(threshold))) if threshold >= 0 else 0
        return Split(seed=seed, threshold=threshold, num_documents=n, num_val=num_val)
    num_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, round(val_fraction * n)))
    threshold = -1 if num_val == 0 else int(np.partition(hashes, num_val - 1)[num_val - 1])
    return Split(seed=seed, threshold=threshold, num_documents=n, num_val=num_val)
