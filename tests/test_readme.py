"""The README's "Input and Output Dimensions" table is what the seed preset really does."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tinyllm.config import ModelConfig
from tinyllm.model import GPT

README = Path(__file__).resolve().parents[1] / "README.md"


def _table() -> dict[str, tuple[str, str]]:
    text = README.read_text().split("## Input and Output Dimensions", 1)[1]
    rows = re.findall(r"^\| ([^|]+?) \| (\([^|]+\)) \| (\([^|]+\)) \|$", text, flags=re.M)
    return {stage.split(" (")[0]: (inp, out) for stage, inp, out in rows}


def test_readme_dimension_table_matches_the_seed_model():
    table = _table()
    assert set(table) == {"Embedding", "Transformer blocks", "Output head"}
    model = GPT(ModelConfig.from_name("seed")).eval()
    n = 7
    idx = torch.randint(0, 50257, (1, n))
    with torch.no_grad():
        emb = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(n))
        x = emb
        for block in model.transformer.h:
            x = block(x)
        logits = model.lm_head(model.transformer.ln_f(x))

    def shape(t: torch.Tensor) -> str:
        return "(" + ", ".join("N" if d == n else str(d) for d in t.shape) + ")"

    assert table["Embedding"] == (shape(idx), shape(emb)) == ("(1, N)", "(1, N, 128)")
    assert table["Transformer blocks"] == (shape(emb), shape(x))
    assert table["Output head"] == (shape(x), shape(logits)) == ("(1, N, 128)", "(1, N, 50257)")


def test_make_run_takes_the_servers_environment(tmp_path):
    """`make run` passed --host 127.0.0.1 --port 5000 always, so TINYLLM_HOST / TINYLLM_PORT (documented as the
    server's settings) did nothing there; its own HOST= / PORT= still win."""
    import os
    import shutil
    import subprocess

    import pytest

    if shutil.which("make") is None:
        pytest.skip("no make")
    root = README.parent
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}

    def dry_run(*args: str, **extra: str) -> str:
        cmd = ["make", "-n", "--no-print-directory", "-o", "assets", "run", *args]  # -o: assets count as done
        out = subprocess.run(cmd, cwd=root, env={**env, **extra}, capture_output=True, text=True, check=True).stdout
        (line,) = [line for line in out.splitlines() if "tinyllm run " in line]
        return line.strip()

    assert "--host" not in dry_run(TINYLLM_HOST="0.0.0.0") and "--port" not in dry_run(TINYLLM_PORT="8080")
    assert "--host" not in dry_run(HOST="my-laptop")  # tcsh exports HOST as the machine's name
    assert dry_run("HOST=0.0.0.0", "PORT=6000").endswith("--host 0.0.0.0 --port 6000")
