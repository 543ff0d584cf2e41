"""Sources, documents, errors and the seeded split by whole document."""

from __future__ import annotations

import json
import os

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
        ("bom.txt", b"\xef\xbb\xbf", "file is empty"),  # a byte-order mark alone was one empty document
        ("bom-spaces.md", b"\xef\xbb\xbf \r\n\t\n", "file is empty"),
        ("unicode-spaces.txt", "\u00a0\u3000\n".encode(), "file is empty"),
        ("utf32.txt", "notes".encode("utf-32"), "is UTF-32 text; convert it to UTF-8"),
        ("bom.jsonl", b"\xef\xbb\xbf\n", "bom.jsonl: no non-empty documents"),
        ("utf16.jsonl", '{"text": "hi"}\n'.encode("utf-16"), r"utf16.jsonl: is UTF-16 text; convert it to UTF-8"),
        ("utf16le.jsonl", '{"text": "hi"}\n'.encode("utf-16-le"), r"utf16le.jsonl: is UTF-16 text; convert"),
        ("utf32be.ndjson", '{"text": "hi"}\n'.encode("utf-32-be"), r"utf32be.ndjson: is UTF-32 text; convert"),
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
    with pytest.raises(CorpusError, match="no .txt, .md, .jsonl or .ndjson files"):
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


def _ids(sources):
    return [f.doc_id for f in resolve_sources(sources)]


def test_glob_ids_are_paths_below_the_pattern_folder_and_stay_as_files_are_added(tmp_path, monkeypatch):
    """Glob ids were bare names, renamed when two met: adding `b/x.txt` changed `a/x.txt`'s id (and split side)."""
    _write(tmp_path / "data" / "top.txt", "top")
    _write(tmp_path / "data" / "a" / "x.txt", "alpha")
    _write(tmp_path / "data" / ".hidden" / "x.txt", "skipped, as folders skip it")
    pattern = str(tmp_path / "data" / "**" / "*.txt")
    assert _ids([pattern]) == ["a/x.txt", "top.txt"]
    _write(tmp_path / "data" / "b" / "x.txt", "beta")
    _write(tmp_path / "data" / "b" / "c" / "x.txt", "gamma")
    _write(tmp_path / "data" / "x.txt", "another x")
    assert _ids([pattern]) == ["a/x.txt", "b/c/x.txt", "b/x.txt", "top.txt", "x.txt"]
    assert _ids([str(tmp_path / "data" / "*" / "x.txt")]) == ["a/x.txt", "b/x.txt"]
    assert _ids([str(tmp_path / "data" / "*.txt")]) == ["top.txt", "x.txt"]  # no wildcard folders: names, as before
    monkeypatch.chdir(tmp_path)  # a relative pattern gives the ids of its absolute form (what `train` records)
    assert _ids(["data/**/*.txt"]) == _ids(["./data/**/*.txt"]) == _ids([pattern])
    monkeypatch.chdir(tmp_path / "data")
    assert _ids(["*/x.txt"]) == ["a/x.txt", "b/x.txt"]


def test_two_files_of_one_id_are_an_error_naming_both(tmp_path):
    """They were renamed by their paths below a common folder: which depended on the other files given."""
    a = _write(tmp_path / "s" / "a" / "notes.txt", "notes of a")
    b = _write(tmp_path / "s" / "b" / "notes.txt", "notes of b")
    assert _ids([a]) == ["notes.txt"]
    for sources in ([a, b], [b, a]):
        with pytest.raises(CorpusError, match="would both be document 'notes.txt'") as info:
            resolve_sources(sources)
        assert str(a) in str(info.value) and str(b) in str(info.value) and "quoted glob" in str(info.value)
    assert _ids([str(tmp_path / "s" / "*" / "notes.txt")]) == ["a/notes.txt", "b/notes.txt"]  # what it suggests
    assert _ids([tmp_path / "s"]) == ["s/a/notes.txt", "s/b/notes.txt"]
    # two folders of one name: their files' ids meet too
    _write(tmp_path / "v1" / "data" / "x.txt", "v1")
    _write(tmp_path / "v2" / "data" / "x.txt", "v2")
    with pytest.raises(CorpusError, match=r"v1/data/x.txt and .*v2/data/x.txt would both be document 'data/x.txt'"):
        resolve_sources([tmp_path / "v1" / "data", tmp_path / "v2" / "data"])
    # one file given twice (directly and in its folder) is still one document, not a clash
    assert _ids([tmp_path / "s", a]) == ["s/a/notes.txt", "s/b/notes.txt"]


def test_a_folder_given_as_dot_has_the_ids_of_its_absolute_path(tmp_path, monkeypatch):
    """`prepare .` named its documents "/a.txt" (Path(".").name is ""), `train` (absolute sources) "corpus/a.txt"."""
    _write(tmp_path / "corpus" / "a.txt", "alpha")
    _write(tmp_path / "corpus" / "sub" / "b.md", "beta")
    expected = ["corpus/a.txt", "corpus/sub/b.md"]
    assert _ids([tmp_path / "corpus"]) == expected
    monkeypatch.chdir(tmp_path / "corpus")
    assert _ids(["."]) == _ids(["./"]) == _ids([os.getcwd()]) == expected
    monkeypatch.chdir(tmp_path / "corpus" / "sub")
    assert _ids([".."]) == expected
    assert _ids(["b.md"]) == ["b.md"]


def test_globs_and_folders_end_on_a_symlink_loop(tmp_path):
    """`**` followed a symlink to a parent folder for ever."""
    _write(tmp_path / "data" / "x.txt", "top")
    _write(tmp_path / "data" / "sub" / "y.txt", "below")
    try:
        os.symlink(tmp_path / "data", tmp_path / "data" / "sub" / "loop", target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    assert _ids([str(tmp_path / "data" / "**" / "*.txt")]) == ["sub/y.txt", "x.txt"]
    assert _ids([str(tmp_path / "data" / "**")]) == ["sub/y.txt", "x.txt"]
    assert _ids([tmp_path / "data"]) == ["data/sub/y.txt", "data/x.txt"]


def test_ndjson_and_carriage_returns_in_jsonl(tmp_path):
    lines = [json.dumps({"text": "one\r\ntwo\rthree\n"}), json.dumps({"text": "four"})]
    _write(tmp_path / "docs" / "a.ndjson", "\r\n".join(lines) + "\r\n")  # CR LF between the lines too
    _write(tmp_path / "docs" / "b.txt", "one\r\ntwo\rthree\n")
    files = resolve_sources([tmp_path / "docs"])
    assert [(f.doc_id, f.is_jsonl) for f in files] == [("docs/a.ndjson", True), ("docs/b.txt", False)]
    docs = [(d.id, d.text) for f in files for d in iter_documents(f)]
    assert docs == [
        ("docs/a.ndjson:1", "one\ntwo\nthree\n"),
        ("docs/a.ndjson:2", "four"),
        ("docs/b.txt", "one\ntwo\nthree\n"),
    ]
