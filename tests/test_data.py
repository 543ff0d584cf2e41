"""Token shards cached by content hash, the document split on disk, and the batch sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tinyllm import data as data_mod
from tinyllm.corpus import CorpusError
from tinyllm.data import BatchSampler, PreparedData, prepare


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(10):
        (root / f"doc{i:02d}.txt").write_text(f"Document number {i}.\n" + "To be or not to be. " * (5 + i))
    return root


def _docs_of(tok, tokens: np.ndarray) -> list[str]:
    """Split a token stream at end-of-text tokens back into document texts."""
    out, cur = [], []
    for t in tokens.tolist():
        if t == tok.eot_token:
            out.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "every document ends with end-of-text"
    return out


def test_prepare_splits_by_whole_document(tinyllm_home, gpt2_tokenizer, corpus):
    data = prepare([corpus], val_fraction=0.2, seed=1, progress=False)
    texts = {p.read_text() for p in corpus.iterdir()}
    train, val = _docs_of(gpt2_tokenizer, data.tokens("train")), _docs_of(gpt2_tokenizer, data.tokens("val"))
    assert len(val) == 2 and len(train) == 8
    assert set(train) | set(val) == texts and not set(train) & set(val)
    meta = data.meta
    assert meta["splits"]["val"]["documents"] == 2
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert data.num_tokens("train") == len(data.tokens("train"))
    assert meta["tokenizer"] == "gpt2" and data.tokens("train").dtype == np.uint16
    assert data.dir.parent == tinyllm_home / "data"


def test_cache_is_reused_and_invalidated_by_content(tinyllm_home, gpt2_tokenizer, corpus, monkeypatch):
    first = prepare([corpus], progress=False)
    calls = []
    real_build = data_mod._build
    monkeypatch.setattr(data_mod, "_build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = prepare([corpus], progress=False)
    assert again.dir == first.dir and calls == []
    (corpus / "doc03.txt").write_text("A changed document.")
    changed = prepare([corpus], progress=False)
    assert changed.dir != first.dir and calls == [1]
    assert prepare([corpus], seed=2, progress=False).dir != changed.dir  # the split is part of the key


def test_failed_prepare_leaves_no_cache(tinyllm_home, gpt2_tokenizer, corpus):
    (corpus / "zz.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(CorpusError, match="zz.txt: invalid UTF-8"):
        prepare([corpus], progress=False)
    cache = tinyllm_home / "data"
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.parametrize(
    "paragraph",
    [
        "Line {i}: some words, and\n\n  indented {i}\n",
        "{i} words in a paragraph\n\nNext paragraph.\n",  # cut after "\n\n": one "\n\n" token, not two "\n"s
        "tabs\t\nand {i}\r\nCRLF\n \nNext\n",
    ],
)
def test_chunked_tokenization_equals_whole_text(gpt2_tokenizer, monkeypatch, paragraph):
    text = "".join(paragraph.format(i=i) for i in range(400))
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 100)
    pieces = list(data_mod._pieces(text))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [t for p in pieces for t in gpt2_tokenizer.encode(p)] == gpt2_tokenizer.encode(text)


def test_files_of_one_name_from_different_folders_are_different_documents(tinyllm_home, gpt2_tokenizer, tmp_path):
    """They shared an id ("notes.txt"), so the split sent all of them to the same side: now a glob tells them apart
    by their paths below its folder, and the same files given one by one are an error rather than renamed."""
    for name in ("a", "b", "c", "d"):
        (tmp_path / "s" / name).mkdir(parents=True)
        (tmp_path / "s" / name / "notes.txt").write_text(f"notes of {name} " * 300 + "\n")
    pattern = str(tmp_path / "s" / "*" / "notes.txt")
    assert [f.doc_id for f in data_mod.resolve_sources([pattern])] == [f"{n}/notes.txt" for n in "abcd"]
    data = prepare([pattern], val_fraction=0.25, progress=False)
    assert (data.meta["splits"]["train"]["documents"], data.meta["splits"]["val"]["documents"]) == (3, 1)
    assert data.meta["sources"] == [str(tmp_path / "s" / n / "notes.txt") for n in "abcd"]  # paths, not "a".."d"
    with pytest.raises(CorpusError, match="would both be document 'notes.txt'"):
        prepare([str(tmp_path / "s" / n / "notes.txt") for n in "abcd"], progress=False)


def test_a_folder_given_as_dot_is_prepared_as_its_absolute_path(tinyllm_home, gpt2_tokenizer, corpus, monkeypatch):
    """The ids (and so the cache key and split) of `prepare .` differed from those of `train`'s absolute sources."""
    absolute = prepare([corpus], val_fraction=0.2, progress=False)
    monkeypatch.chdir(corpus)
    for relative in (".", "./"):
        data = prepare([relative], val_fraction=0.2, progress=False)
        assert data.dir == absolute.dir and data.meta["sources"] == ["corpus"]


def test_jsonl_carriage_returns_are_read_as_newlines(tinyllm_home, gpt2_tokenizer, tmp_path):
    texts = [f"Line {i} of a record\nand its second line\n" * 20 for i in range(6)]
    lf, crlf = tmp_path / "lf.jsonl", tmp_path / "crlf.ndjson"
    lf.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    crlf.write_text("".join(json.dumps({"text": t.replace("\n", "\r\n")}) + "\n" for t in texts))
    a, b = (prepare([p], val_fraction=0.0, progress=False) for p in (lf, crlf))
    assert a.tokens("train").tolist() == b.tokens("train").tolist()
    assert "\r" not in gpt2_tokenizer.decode(b.tokens("train").tolist())
    assert a.num_bytes("train") == b.num_bytes("train") == sum(len(t) for t in texts)
    # a cache of the CRs (prepared before they were read as LF) is not reused: the key marks them
    key = data_mod._content_key(data_mod.resolve_sources([crlf]), tokenizer="gpt2", val_fraction=0.0, seed=1)
    crlf.write_text(crlf.read_text().replace("\\r", "\\u000d"))
    assert data_mod._content_key(data_mod.resolve_sources([crlf]), tokenizer="gpt2", val_fraction=0.0, seed=1) != key
    escape = data_mod._JSONL_CR
    assert escape.search(b'"a\\r\\n"') and escape.search(b'"a\\u000D"') and not escape.search(b'"a\\n"')


def _staging(cache, name, age_s=0.0):
    path = cache / name
    path.mkdir(parents=True)
    (path / "train.bin").write_bytes(b"\0\0")
    if age_s:
        old = time.time() - age_s
        os.utime(path / "train.bin", (old, old))
        os.utime(path, (old, old))
    return path


def test_a_build_removes_stale_staging_directories_only(tinyllm_home, gpt2_tokenizer, corpus):
    """A prepare killed by SIGTERM left `.<key>-*` staging directories beside the cache for ever."""
    cache, key, host = tinyllm_home / "data", "0123456789abcdef" * 2, data_mod._host()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    day, idle = data_mod.STALE_STAGING_SECONDS, data_mod.DEAD_OWNER_IDLE_SECONDS
    removed = [
        _staging(cache, f".{key}-{dead}@{host}-k1ll3d_", age_s=idle + 60),  # this machine's, its process gone
        _staging(cache, f".{key}-{os.getpid()}@other-host-0ld", age_s=day + 60),  # another machine's, idle a day
        _staging(cache, f".{key}-abc_123x", age_s=day + 60),  # named before names held the process: by age
        _staging(cache, f".{key}-{os.getpid()}@{host}-r3us3d", age_s=day + 60),  # its process id taken since
    ]
    kept = [
        _staging(cache, f".{key}-{os.getpid()}@{host}-runn1ng"),  # this process's (still building)
        # its process looks gone, but it was written a minute ago: a container sharing the host name and cache
        # sees other process ids, so a live build there may look dead here
        _staging(cache, f".{key}-{dead}@{host}-c0ntnr", age_s=60),
        _staging(cache, f".{key}-{dead}@other-host-r3cent", age_s=60),  # another machine's, written a minute ago
        _staging(cache, f".{key}-abc_456y", age_s=60),
        _staging(cache, ".not-a-staging-dir", age_s=day + 60),
    ]
    data = prepare([corpus], progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted([data.dir.name] + [p.name for p in kept])
    assert not any(p.exists() for p in removed)


def test_an_interrupted_build_removes_its_staging_directory(tinyllm_home, gpt2_tokenizer, corpus, monkeypatch):
    real = data_mod.iter_documents
    seen = []

    def interrupted(source):
        seen.append(source)
        if len(seen) == 3:
            raise KeyboardInterrupt
        yield from real(source)

    monkeypatch.setattr(data_mod, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus], progress=False)
    assert len(seen) == 3 and list((tinyllm_home / "data").iterdir()) == []


def test_the_pipeline_writes_every_piece_in_order(tinyllm_home, gpt2_tokenizer, corpus, monkeypatch):
    """Tiny pieces, a short in-flight queue and small writes: the shards equal encoding each document whole."""
    for i in range(3):
        (corpus / f"long{i}.txt").write_text("".join(f"Line {j} of {i}: words, and\n  more {j}\n" for j in range(300)))
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 64)
    monkeypatch.setattr(data_mod, "IN_FLIGHT", 3)
    monkeypatch.setattr(data_mod, "WRITE_TOKENS", 50)
    data = prepare([corpus], val_fraction=0.3, seed=3, progress=False, num_threads=2)
    for split in ("train", "val"):
        docs = _docs_of(gpt2_tokenizer, data.tokens(split))
        expected = [t for doc in docs for t in [*gpt2_tokenizer.encode(doc), gpt2_tokenizer.eot_token]]
        assert data.tokens(split).tolist() == expected
        assert data.num_tokens(split) == len(expected) == data.meta["splits"][split]["tokens"]
    everything = _docs_of(gpt2_tokenizer, data.tokens("train")) + _docs_of(gpt2_tokenizer, data.tokens("val"))
    assert sorted(everything) == sorted(p.read_text() for p in corpus.iterdir())


def test_single_document_is_held_out_by_position(tinyllm_home, gpt2_tokenizer, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(f"Line {i} of the only document.\n" for i in range(200)))
    data = prepare([path], val_fraction=0.1, progress=False)
    train, val = _docs_of(gpt2_tokenizer, data.tokens("train")), _docs_of(gpt2_tokenizer, data.tokens("val"))
    assert train[0] + val[0] == path.read_text()
    assert 0.05 < len(val[0]) / len(path.read_text()) < 0.15


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog. " * 200,  # no line break at all: cut between words
        "x" * 5000,  # nor a space: cut where the fraction falls
        "".join(f"Line {i}.\n" for i in range(100)) + "and a last paragraph without line breaks " * 40,
    ],
)
def test_single_document_without_line_breaks_is_still_held_out(tinyllm_home, gpt2_tokenizer, tmp_path, text):
    path = tmp_path / "one.txt"
    path.write_text(text)
    data = prepare([path], val_fraction=0.1, progress=False)
    (train,), (val,) = _docs_of(gpt2_tokenizer, data.tokens("train")), _docs_of(gpt2_tokenizer, data.tokens("val"))
    assert train + val == text
    assert 0.05 < len(val) / len(text) < 0.15
    if " " in text:  # cut between words: the validation text opens with a word
        assert train.endswith(" ") and not val.startswith(" ")


def test_corpus_shorter_than_a_context_window(tinyllm_home, gpt2_tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Too short.")
    with pytest.raises(CorpusError, match="fewer than the 257 one context window needs"):
        prepare([path], min_tokens=257, progress=False)


def test_prepared_data_load_errors(tmp_path):
    with pytest.raises(CorpusError, match="not a prepared data directory"):
        PreparedData.load(tmp_path)


def test_batch_sampler_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, batch_size=4, block_size=16, seed=3)
    x, y = a.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    b = BatchSampler(tokens, batch_size=4, block_size=16, seed=3)
    assert torch.equal(b.next_batch()[0], x)
    other_rank = BatchSampler(tokens, batch_size=4, block_size=16, seed=3, rank=1)
    assert not torch.equal(other_rank.next_batch()[0], x)


def test_batch_sampler_resumes_exactly():
    tokens = np.arange(5000, dtype=np.uint16)
    straight = BatchSampler(tokens, batch_size=2, block_size=8, seed=0)
    batches = [straight.next_batch()[0] for _ in range(6)]
    first = BatchSampler(tokens, batch_size=2, block_size=8, seed=0)
    for _ in range(3):
        first.next_batch()
    resumed = BatchSampler(tokens, batch_size=2, block_size=8, seed=123)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(resumed.next_batch()[0], b) for b in batches[3:])


def test_batch_sampler_rejects_short_streams_and_bad_sizes():
    with pytest.raises(CorpusError, match="fewer than one context window"):
        BatchSampler(np.arange(10, dtype=np.uint16), batch_size=1, block_size=10)
    with pytest.raises(ValueError, match="positive"):
        BatchSampler(np.arange(100, dtype=np.uint16), batch_size=0, block_size=10)


def test_windows_line_endings_are_read_as_newlines(tinyllm_home, gpt2_tokenizer, tmp_path):
    """The CRs were kept: the model learned "\r\n" apart from "\n", and samples showed them."""
    text = "First line of a play\n\nSecond line, then more\nand more words here\n" * 40
    for name, body in (("lf", text), ("crlf", text.replace("\n", "\r\n")), ("cr", text.replace("\n", "\r"))):
        (tmp_path / name).mkdir()
        for i in range(4):
            (tmp_path / name / f"doc{i}.txt").write_bytes(body.encode())
    prepared = {name: prepare([tmp_path / name], progress=False) for name in ("lf", "crlf", "cr")}
    tokens = {name: data.tokens("train").tolist() + data.tokens("val").tolist() for name, data in prepared.items()}
    assert tokens["crlf"] == tokens["lf"] == tokens["cr"]
    assert "\r" not in gpt2_tokenizer.decode(tokens["crlf"])
    assert prepared["crlf"].dir != prepared["lf"].dir  # other bytes, other key (and a cache of the CRs is not reused)
