"""Sources, documents, errors and the seeded split by whole document."""

from __future__ import annotations

import json

import pytest

from tinyllm.corpus import CorpusError, iter_documents, make_split, resolve_sources


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_files_folders_globs_and_jsonl(tmp_path):
    _write(tmp_path / "a.txt", "alpha")
    _write(tmp_path / "docs" / "b.md", "beta")
    _write(tmp_path / "docs" / "sub" / "c.txt", "gamma")
    _write(tmp_path / "docs" / "ignored.bin", "x")
    _write(tmp_path / "d.jsonl", json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    files = resolve_sources([tmp_path / "a.txt", tmp_path / "docs", str(tmp_path / "*.jsonl")])
    assert [f.doc_id for f in files] == ["a.txt", "docs/b.md", "docs/sub/c.txt", "d.jsonl"]
    docs = [d for f in files for d in iter_documents(f)]
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt", "alpha"),
        ("docs/b.md", "beta"),
        ("docs/sub/c.txt", "gamma"),
        ("d.jsonl:1", "one"),
        ("d.jsonl:3", "two"),
    ]


def test_duplicate_sources_are_read_once(tmp_path):
    f = _write(tmp_path / "a.txt", "alpha")
    assert len(resolve_sources([f, f, tmp_path])) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"  \n", "file is empty"),
        ("binary.txt", b"abc\x00\x01\x02", "binary file"),
        ("utf16.txt", "notes".encode("utf-16"), "is UTF-16 text; convert it to UTF-8"),
        ("latin1.txt", "café".encode("latin-1"), "invalid UTF-8 at byte 3"),
        ("bad.jsonl", b'{"text": "ok"}\n{"title": "no text"}\n', 'bad.jsonl:2: line has no "text"'),
        ("broken.jsonl", b'{"text": "ok"}\n{not json\n', "broken.jsonl:2: not valid JSON"),
    ],
)
def test_bad_files_name_the_file_and_the_fix(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message) as info:
        for f in resolve_sources([path]):
            list(iter_documents(f))
    assert str(path) in str(info.value)


def test_jsonl_with_a_byte_order_mark_and_a_lone_surrogate(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')  # as Windows tools write it
    assert [d.text for f in resolve_sources([bom]) for d in iter_documents(f)] == ["first", "second"]
    bad = tmp_path / "surrogate.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "\\ud800 alone"}\n')
    with pytest.raises(CorpusError, match="surrogate.jsonl:2: the text holds a lone surrogate"):
        [d for f in resolve_sources([bad]) for d in iter_documents(f)]


def test_folders_skip_hidden_files_and_folders(tmp_path):
    _write(tmp_path / "notes" / "a.txt", "alpha")
    _write(tmp_path / "notes" / ".hidden.txt", "a copy")
    _write(tmp_path / "notes" / ".ipynb_checkpoints" / "a-checkpoint.txt", "alpha again")
    _write(tmp_path / "notes" / "sub" / "b.md", "beta")
    assert [f.doc_id for f in resolve_sources([tmp_path / "notes"])] == ["notes/a.txt", "notes/sub/b.md"]


def test_file_names_that_are_not_utf8(tmp_path):
    import os

    folder = tmp_path / "nf"
    folder.mkdir()
    try:
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:
            f.write(b"hello there\n" * 20)
    except OSError:
        pytest.skip("this file system wants UTF-8 names")
    (f_,) = resolve_sources([folder])
    assert [d.text for d in iter_documents(f_)] == ["hello there\n" * 20]
    assert make_split([f_.doc_id, "other"], val_fraction=0.5, seed=1).num_val == 1  # hashes the id


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(CorpusError, match="no such file or folder"):
        resolve_sources([tmp_path / "nope.txt"])
    with pytest.raises(CorpusError, match="matches no files"):
        resolve_sources([str(tmp_path / "*.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .txt, .md or .jsonl"):
        resolve_sources([tmp_path / "empty"])


def test_split_is_seeded_deterministic_and_sized():
    ids = [f"doc{i}" for i in range(42)]
    split = make_split(ids, val_fraction=0.1, seed=1337)
    held = [d for d in ids if split.is_val(d)]
    assert len(held) == split.num_val == 4
    # the same seed gives the same documents whatever the order of discovery
    again = make_split(list(reversed(ids)), val_fraction=0.1, seed=1337)
    assert [d for d in ids if again.is_val(d)] == held
    other = make_split(ids, val_fraction=0.1, seed=7)
    assert [d for d in ids if other.is_val(d)] != held


def test_split_edge_cases():
    assert make_split(["only"], val_fraction=0.1, seed=0).num_val == 0
    assert make_split(["a", "b"], val_fraction=0.01, seed=0).num_val == 1
    assert make_split(["a", "b"], val_fraction=0.0, seed=0).num_val == 0
    with pytest.raises(CorpusError, match="val_fraction"):
        make_split(["a"], val_fraction=1.5, seed=0)
