"""The Docker image: static checks of the Dockerfile (fast) and a real build + run + curl (slow).

The slow test runs `docker/docker-test.sh` (what `make docker-test` runs): it builds the image with podman
(or docker), starts it, waits for /health, sends the seed's two curl requests and writes what it saw to a
JSON file, which is asserted here. It takes minutes (pip install, asset fetch, a short training run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PROMPT = "The future of AI is"


def _stages(text: str) -> list[str]:
    return re.split(r"(?m)^FROM\s", text)[1:]


def test_dockerfile_is_multi_stage_non_root_and_healthchecked():
    text = DOCKERFILE.read_text()
    builder, final = _stages(text)
    assert "AS builder" in builder.splitlines()[0]
    assert "pip install" in builder and "fetch-assets" in builder and "build-checkpoint.sh" in builder
    # The final stage takes products of the builder only (no pip, no training), and a C compiler for the decode
    # step unless built with C_COMPILER= (empty).
    assert "pip install" not in final
    assert re.search(r"(?m)^ARG C_COMPILER=gcc$", final)
    assert [line for line in final.splitlines() if "apt-get install" in line] == [
        "     && apt-get install -y --no-install-recommends ${C_COMPILER} libc6-dev \\"
    ]
    assert 'if [ -n "${C_COMPILER}" ]' in final
    assert re.search(r"(?m)^USER\s+(?!root|0\b)\w+", final), "the final image must run as a non-root user"
    assert re.search(r"(?m)^EXPOSE\s+5000\b", final)
    assert re.search(r"TINYLLM_HOST=0\.0\.0\.0", final)
    assert re.search(r"(?m)^HEALTHCHECK\b.*(\n\s+.*)*?/health", final)
    assert re.search(r"(?m)^CMD\s", final)
    for arg, default in [
        ("BASE_IMAGE", "python:3.11-slim"),
        ("PIP_EXTRA_INDEX_URL", "https://download.pytorch.org/whl/cpu"),
        ("PIP_INDEX_URL", "https://pypi.org/simple"),
        ("TRAIN_MINUTES", "2"),
    ]:
        assert re.search(rf"(?m)^ARG {arg}={re.escape(default)}$", text), arg


def test_dockerignore_keeps_local_state_out_of_the_context():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for must in (".git", ".venv", "runs", "test-artifacts", ".pytest_cache", "**/__pycache__"):
        assert must in patterns, must
    # The context has what the Dockerfile copies.
    for path in ("requirements.txt", "pyproject.toml", "README.md", "app.py", "train.py", "src", "docker/checkpoint"):
        assert (ROOT / path).exists(), path


def test_helper_scripts_parse():
    for script in ("docker/docker-test.sh", "docker/make-base-image.sh"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
    subprocess.run(["sh", "-n", str(ROOT / "docker/build-checkpoint.sh")], check=True)


def test_build_checkpoint_ships_the_models_own_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The image's model is served with only the assets in TINYLLM_HOME: a checkpoint trained with a corpus BPE
    must carry that tokenizer (it did not: the served model failed to load, "unknown tokenizer 'bpe4096-...'")."""
    import sys

    import torch

    from tinyllm.checkpoint import load_checkpoint, save_checkpoint
    from tinyllm.config import ModelConfig
    from tinyllm.model import GPT
    from tinyllm.tokenizer import train_bpe

    text = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 30
    tok = train_bpe([text], vocab_size=300)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    supplied, out = tmp_path / "supplied", tmp_path / "out"
    save_checkpoint(supplied / "run" / "best", model=model, tokenizer=tok, optimizer={"state": {}})
    builder_home, served_home = tmp_path / "builder-home", tmp_path / "served-home"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TINYLLM_HOME": str(builder_home),
    }
    proc = subprocess.run(
        ["sh", str(ROOT / "docker/build-checkpoint.sh"), str(supplied), str(out)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"tokenizer: {tok.name} 300 tokens" in proc.stdout
    shipped = sorted(p.name for p in (out / "best").iterdir())
    assert shipped == ["config.json", "meta.json", "model.safetensors", "ranks.tiktoken", "tokenizer.json"]

    monkeypatch.setenv("TINYLLM_HOME", str(served_home))  # no trained tokenizers there
    ckpt = load_checkpoint(out / "best")
    assert ckpt.tokenizer().name == tok.name
    assert ckpt.tokenizer().encode(text[:80]) == tok.encode(text[:80])
    assert torch.equal(ckpt.model.lm_head.weight, model.lm_head.weight)


def _engine() -> str | None:
    for engine in ("podman", "docker"):
        if shutil.which(engine) and subprocess.run([engine, "info"], capture_output=True).returncode == 0:
            return engine
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_image_builds_runs_and_answers_the_seed_requests(tmp_path: Path):
    engine = _engine()
    if engine is None:
        pytest.skip("no working podman or docker (make docker-test needs one)")
    results_path = tmp_path / "results.json"
    env = {**os.environ, "ENGINE": engine, "RESULTS": str(results_path)}
    proc = subprocess.run(["bash", str(ROOT / "docker/docker-test.sh")], env=env, capture_output=True, text=True)
    assert results_path.exists(), f"docker-test.sh wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(results_path.read_text())
    context = json.dumps(results, indent=1)[:3000] + "\n" + proc.stdout[-2000:]

    assert results["healthy"], context
    assert results["custom"]["status"] == 200, context
    assert results["custom"]["body"]["generated_text"].startswith(PROMPT), context
    assert len(results["custom"]["body"]["generated_text"]) > len(PROMPT), context
    # No GPT-2 weights can be fetched here: a 503 whose JSON says so, not a crash or a hang.
    assert results["gpt2"]["status"] == 503, context
    assert "gpt2" in results["gpt2"]["body"]["detail"].lower(), context
    assert results["healthcheck"], context
    assert results["uid"] not in (None, 0), context
    assert results["torch"].endswith(" None"), f"torch in the image is not a CPU build: {results['torch']}"
    # The image keeps a C compiler: the custom model's batch-1 decode step is the C one, built at start-up.
    assert results["decode_step"] == "c", context
    assert results["image_bytes"] < 2_000_000_000, f"image is {results['image_bytes'] / 1e9:.2f} GB"
    assert proc.returncode == 0 and results["passed"], context
