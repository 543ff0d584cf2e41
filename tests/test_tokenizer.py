"""GPT-2 BPE through tiktoken, offline, and the UTF-8-safe incremental decoder."""

from __future__ import annotations

import pytest

from tinyllm import assets
from tinyllm.tokenizer import TokenizerError, get_tokenizer, load_ranks


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


def test_ranks_file_is_verified(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(TokenizerError, match="sha256"):
        load_ranks(bad)
    assert load_ranks(bad, expected_sha256=None) == {b"Hello": 0}


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("nope")


def test_ranks_sha_matches_design():
    assert assets.GPT2_RANKS_SHA256.startswith("306cd27f")
