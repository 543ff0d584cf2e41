"""Shared fixtures: hermetic tinyllm homes and the GPT-2 tokenizer (from the assets `make` fetches)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tinyllm import assets

REAL_HOME = assets.tinyllm_home()


def _have_ranks() -> bool:
    return (REAL_HOME / "assets" / "gpt2.tiktoken").exists()


@pytest.fixture
def tinyllm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `TINYLLM_HOME` whose assets point at the real (fetched) ones; caches and runs stay in tmp."""
    home = tmp_path / "tinyllm-home"
    home.mkdir()
    if (REAL_HOME / "assets").exists():
        os.symlink(REAL_HOME / "assets", home / "assets")
    monkeypatch.setenv("TINYLLM_HOME", str(home))
    return home


@pytest.fixture
def gpt2_tokenizer():
    """The real GPT-2 BPE; skipped where `tinyllm fetch-assets` has not run (make test runs it)."""
    if not _have_ranks():
        pytest.skip("GPT-2 BPE ranks not fetched; run `tinyllm fetch-assets`")
    from tinyllm.tokenizer import get_tokenizer

    return get_tokenizer()


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "park", "while", "birds", "sang", "in"]


@pytest.fixture
def corpus(tmp_path: Path, tinyllm_home: Path, gpt2_tokenizer) -> Path:
    """A tiny, learnable corpus: eight short documents of simple repetitive sentences (~10 KB)."""
    rng = random.Random(0)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for d in range(8):
        lines = [" ".join(rng.choice(WORDS) for _ in range(10)) + "." for _ in range(30)]
        (folder / f"doc{d}.txt").write_text("\n".join(lines) + "\n")
    return folder
