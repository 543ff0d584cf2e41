"""Where text comes from: the built-in corpus or the user's files, folders, globs and JSONL.

A corpus is a list of sources resolved to files; each file yields documents lazily (a `.txt`/`.md` file is
one document, each line of a `.jsonl`/`.ndjson` file with a `text` field is one), so memory does not grow with
corpus size. The train/validation split is by whole document, seeded and deterministic: a document's side
depends only on the seed and its stable id, never on the machine, the order of discovery or the other files.
A file's id (plus the line for JSONL) is a function of its source argument and the file alone:

- a file given directly: its name (`notes.txt`);
- a folder: the folder's name and the path below it (`docs/sub/c.txt`; `.` is named as its absolute path is);
- a glob: the path below the pattern's folder before its first wildcard (`data/**/*.txt` gives `a/x.txt`);
- the built-in corpus: `shakespeare/<file>`.

Two files that would share an id (two `notes.txt` given directly) are an error naming both, not renamed: a
rename that depends on which other files are present would move documents across the split as a corpus grows.
Folders and `**` skip hidden files and folders (`.git`, `.ipynb_checkpoints`); `**` does not follow symlinked
folders, so a symlink loop ends.
"""

from __future__ import annotations

import fnmatch
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
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BUILTIN = "shakespeare"
_WILDCARDS = "*?["


class CorpusError(TinyLLMError):
    """A source cannot be read as text: the message names the file and what to do."""


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus, with the stable id prefix its documents carry."""

    path: Path
    doc_id: str  # stable across machines and corpus growth: see the module docstring
    source: str = ""  # what prepared metadata lists it under: the built-in corpus's or a folder's name, else its path

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
    """Expand paths, folders and globs into a sorted list of files; None or "shakespeare" is the built-in corpus.

    Raises:
        CorpusError: a source is missing or matches nothing, or two files would share a document id.
    """
    if not sources:
        sources = [BUILTIN]
    files: list[SourceFile] = []
    for source in sources:
        text = str(source)
        if text == BUILTIN:
            from tinyllm import assets

            root = assets.fetch_shakespeare()
            files += [SourceFile(p, f"{BUILTIN}/{p.name}", BUILTIN) for p in sorted(root.glob("*.txt"))]
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")  # (pathlib's rglob does not descend into symlinked folders)
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise CorpusError(
                    f"{path}: folder has no .txt, .md, .jsonl or .ndjson files; add some or pass files directly"
                )
            # named as its absolute path is (what `train` records), so `.`, `./` and `/abs/dir` give one id
            name = Path(os.path.abspath(path)).name
            prefix = f"{name}/" if name else ""
            files += [SourceFile(p, prefix + p.relative_to(path).as_posix(), name or str(path)) for p in found]
        elif path.is_file():
            files.append(SourceFile(path, path.name, str(path)))
        elif any(ch in text for ch in _WILDCARDS):
            matches = _glob(path)
            if not matches:
                raise CorpusError(f"{text}: pattern matches no files; check the pattern")
            files += [SourceFile(p, doc_id, str(p)) for p, doc_id in matches]
        else:
            raise CorpusError(f"{text}: no such file or folder; pass text files, folders, globs or 'shakespeare'")
    unique: dict[Path, SourceFile] = {}
    by_id: dict[str, SourceFile] = {}
    for f in files:
        resolved = f.path.resolve()
        if resolved in unique:  # the same file twice (given directly and inside a folder): read once
            continue
        other = by_id.get(f.doc_id)
        if other is not None:
            raise CorpusError(
                f"{other.path} and {f.path} would both be document {f.doc_id!r}, and a document's id decides its "
                f"side of the split; pass their common folder, or a quoted glob such as 'dir/*/{f.path.name}' (whose "
                "ids are the paths below 'dir'), instead of the files or folders one by one"
            )
        unique[resolved] = by_id[f.doc_id] = f
    return list(unique.values())


def _glob(pattern: Path) -> list[tuple[Path, str]]:
    """The files a glob matches, sorted, each with its id: its path below the pattern's folder before its first
    wildcard. `**` is any number of folders, walked without following symlinks (a symlink loop ends); hidden
    names match only a part that starts with a dot, as in `glob`."""
    parts = pattern.parts
    fixed = next((i for i, part in enumerate(parts) if any(ch in part for ch in _WILDCARDS)), None)
    if fixed is None:  # (a wildcard only in a `~user` part that expanded away): no pattern left to match
        return []
    base = Path(*parts[:fixed]) if fixed else Path(".")
    found = {p for p in _match(base, parts[fixed:]) if p.is_file()}
    return sorted((p, p.relative_to(base).as_posix()) for p in found)


def _match(folder: Path, parts: Sequence[str]) -> Iterator[Path]:
    head, rest = parts[0], parts[1:]
    if head == "**":
        for top, dirs, names in os.walk(folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if rest:
                yield from _match(Path(top), rest)
            else:
                yield from (Path(top, n) for n in sorted(names) if not n.startswith("."))
        return
    if not any(ch in head for ch in _WILDCARDS):
        names = [head]
    else:
        try:
            names = fnmatch.filter(sorted(os.listdir(folder)), head)
        except OSError:  # not a folder, or unreadable: nothing matches below it
            return
        if not head.startswith("."):
            names = [n for n in names if not n.startswith(".")]
    for name in names:
        child = folder / name
        if not rest:
            yield child
        elif child.is_dir():
            yield from _match(child, rest)


_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = {  # (UTF-32's before UTF-16's: "\xff\xfe" opens both little-endian marks)
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


def _newlines(text: str) -> str:
    """Windows' CR LF (and old Macs' CR) read as LF, as Python's text files do: the model learns one newline."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _wide_encoding(path: Path, raw: bytes) -> CorpusError:
    """The error for UTF-16/UTF-32 text (Notepad's "Unicode"), whose NUL bytes would read as binary."""
    name = next((enc for bom, enc in _WIDE_BOMS.items() if raw.startswith(bom)), None)
    if name is None:  # no byte-order mark: JSON's rule (RFC 4627) tells the width from where the NULs fall
        name = json.detect_encoding(raw).upper().split("-LE")[0].split("-BE")[0]
    return CorpusError(f"{path}: is {name} text; convert it to UTF-8 (e.g. `iconv -f {name.lower()} -t utf-8`)")


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith(tuple(_WIDE_BOMS)) and b"\x00" in raw[:8192]:
        raise _wide_encoding(path, raw)
    if b"\x00" in raw[:8192]:
        raise CorpusError(f"{path}: looks like a binary file (NUL bytes); pass UTF-8 text files only")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path}: invalid UTF-8 at byte {exc.start}; convert it to UTF-8 (e.g. `iconv -t utf-8`)"
        ) from None
    if not text.strip():  # (after decoding: a byte-order mark alone, or Unicode spaces, is empty too)
        raise CorpusError(f"{path}: file is empty; remove it or add text")
    return _newlines(text)


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
                if b"\x00" in raw and json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
                    raise _wide_encoding(path, raw)  # rather than "not valid JSON" about its first NUL
                if lineno == 1:  # a byte-order mark (Windows tools write one) may open the file
                    raw = raw.removeprefix(_BOM)
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
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
                    yield Document(f"{source.doc_id}:{lineno}", _newlines(record["text"]))
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
