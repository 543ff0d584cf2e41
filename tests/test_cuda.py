"""The CUDA paths: device detection, bf16 autocast training, torch.compile, NCCL under torchrun, the engine's
oracles on the GPU. Skipped where no CUDA GPU is present (CI is CPU only); run on a GPU machine with
`pytest tests/test_cuda.py` (BENCHMARKS.md records such a run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyllm.checkpoint import load_checkpoint, load_train_state
from tinyllm.config import ModelConfig
from tinyllm.engine import generate, generate_naive
from tinyllm.model import GPT
from tinyllm.sampling import SamplingParams
from tinyllm.train import detect_device, resolve_dtype, train, train_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ModelConfig(block_size=32, n_layer=2, n_head=2, n_embd=64)
PROMPTS = [[1, 2, 3], [7], [4, 5, 6, 7, 8, 9, 10], [11, 12]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(autouse=True)
def exact_fp32():
    """Full fp32 matmuls for the oracles (training turns TF32 on for itself)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def tiny_run(tmp_path: Path, corpus: Path, name: str, **overrides):
    fields = dict(model=TINY, data=(str(corpus),), val_fraction=0.25, batch_size=8, lr=3e-3, warmup_steps=2,
                  max_minutes=None, max_steps=30, eval_interval=15, eval_iters=2, log_interval=1, sample_tokens=4,
                  device="cuda", run_dir=str(tmp_path / name))  # fmt: skip
    return train_config(**{**fields, **overrides})


def evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "eval"]


def test_auto_picks_cuda_and_bf16():
    assert detect_device("auto").type == "cuda"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16  # every GPU since Ampere


def test_greedy_with_cache_equals_naive_on_cuda():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("seed")).cuda().eval()
    expected = generate_naive(model, PROMPTS, GREEDY, eos_token_id=None)
    results = generate(model, PROMPTS, GREEDY, eos_token_id=None)
    assert [r.token_ids for r in results] == expected
    assert all(len(ids) == 12 for ids in expected)


def test_sequence_in_a_batch_equals_it_alone_on_cuda():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("seed")).cuda().eval()
    params = [GREEDY, SamplingParams(temperature=0.8, seed=2, max_new_tokens=9)] * 2
    together = generate(model, PROMPTS, params, eos_token_id=None)
    alone = [generate(model, [p], sp, eos_token_id=None)[0] for p, sp in zip(PROMPTS, params, strict=True)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in together] == [12, 9, 12, 9]


def test_bf16_training_on_cuda_learns_and_its_checkpoint_loads_on_cpu(tmp_path, corpus):
    result = train(tiny_run(tmp_path, corpus, "bf16", dtype="auto"), progress=False)
    losses = [r["val_loss"] for r in evals(tmp_path / "bf16")]
    assert losses[-1] < losses[0] - 1.5  # from ~ln(50257) = 10.8
    ckpt = load_checkpoint(result.last_checkpoint)  # weights saved from the GPU, loaded on the CPU
    assert ckpt.meta["step"] == 30 and next(ckpt.model.parameters()).device.type == "cpu"
    assert all(t.dtype == torch.float32 for t in ckpt.model.state_dict().values())  # autocast kept fp32 masters


def test_compiled_training_matches_eager_on_cuda(tmp_path, corpus):
    """torch.compile changes kernels, not the maths: same seeds, same data, losses within bf16 noise."""
    short = dict(max_steps=10, eval_interval=10)
    eager = train(tiny_run(tmp_path, corpus, "eager", **short), progress=False)
    compiled = train(tiny_run(tmp_path, corpus, "compiled", compile=True, **short), progress=False)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=0.02)
    assert compiled.val_loss < evals(tmp_path / "compiled")[0]["val_loss"] - 1.0
    assert sorted(load_checkpoint(compiled.last_checkpoint).model.state_dict()) == sorted(
        load_checkpoint(eager.last_checkpoint).model.state_dict()
    )  # no "_orig_mod." prefixes in a compiled run's checkpoint


def test_torchrun_trains_with_ddp_over_nccl(tmp_path, corpus, tinyllm_home):
    """One GPU here, so one process: the NCCL group, DDP's all-reduce and rank 0's files all run."""
    run = tmp_path / "ddp"
    nproc = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(tmp_path / "torchrun"), "-m", "tinyllm", "train", "--data", str(corpus),
           "--preset", "seed", "--block-size", "16", "--batch-size", "2",
           "--max-steps", "4", "--eval-interval", "2", "--eval-iters", "2", "--device", "cuda", "--run-dir", str(run),
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "TINYLLM_HOME": str(tinyllm_home)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{nproc} process(es) (DDP, nccl)" in proc.stderr
    assert proc.stdout.count("trained 4 steps") == 1
    ckpt = load_checkpoint(run / "last")
    assert ckpt.meta["step"] == 4 and ckpt.meta["tokens_seen"] == 4 * 2 * 16 * nproc
    _, state = load_train_state(run / "last")
    assert state["world_size"] == nproc


def test_float16_with_a_grad_scaler_learns_on_cuda(tmp_path, corpus):
    """The path of GPUs without bf16 (a T4, a V100): fp16 autocast and a GradScaler, whose state is saved."""
    result = train(tiny_run(tmp_path, corpus, "fp16", dtype="float16"), progress=False)
    losses = [r["val_loss"] for r in evals(tmp_path / "fp16")]
    assert losses[-1] < losses[0] - 1.5
    _, state = load_train_state(result.last_checkpoint)
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] > 0  # steps that did not overflow


def test_the_server_decodes_on_the_gpu_and_a_request_in_a_busy_batch_equals_it_alone(tmp_path, tinyllm_home):
    """`ServerSettings.device` "auto" puts a checkpoint on the GPU; four requests held until all are queued
    decode in one batch there, each as it decodes alone."""
    import threading
    import time

    from fastapi.testclient import TestClient
    from server_helpers import held_engine

    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.server import ServerSettings, create_app

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", model=GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)))
    settings = ServerSettings(checkpoint=str(tmp_path / "ckpt"), gpt2=None, slots=4, load_wait_s=60)
    gate = threading.Event()
    body = [{"model": "custom", "prompt": f"number {i} " * (i + 1), "max_tokens": 10, "temperature": 0.8, "seed": i}
            for i in range(4)]  # fmt: skip
    with TestClient(create_app(settings, engine_factory=held_engine(gate)), base_url="http://localhost") as client:
        model = client.get("/ready").json()["models"]["custom"]
        assert (model["state"], model["device"]) == ("ready", "cuda:0")
        worker = client.app.state.workers["custom"]
        out: list = [None] * 4

        def send(i: int) -> None:
            out[i] = client.post("/v1/completions", json=body[i]).json()["choices"][0]["text"]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while worker.queue_depth < 4:
            assert time.monotonic() < deadline, "the requests did not queue"
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(30)
        alone = [client.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in body]
        assert out == alone and all(alone)
        assert client.post("/generate/custom", json={"prompt": "Hello"}).json()["generated_text"].startswith("Hello")
