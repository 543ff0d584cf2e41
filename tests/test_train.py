"""Training: loss falls, resume is exact, budgets stop where they say, DDP writes once, fine-tuning, errors, files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tinyllm import train as train_mod
from tinyllm.checkpoint import load_checkpoint, load_train_state
from tinyllm.cli import main
from tinyllm.config import ModelConfig, TrainConfig
from tinyllm.corpus import CorpusError
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT
from tinyllm.optim import OptimizerGroup, ShardedMuon, configure_optimizer, lr_at
from tinyllm.train import TrainError, finetune, finetune_config, resolve_processes, train, train_config

TINY = ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny matmuls on a shared 2-core machine run several times faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path: Path, corpus: Path, **overrides) -> TrainConfig:
    fields = dict(model=TINY, data=(str(corpus),), val_fraction=0.25, batch_size=4, lr=3e-3, warmup_steps=2,
                  max_minutes=None, max_steps=8, eval_interval=4, eval_iters=2, log_interval=1, sample_tokens=4,
                  device="cpu", run_dir=str(tmp_path / "run"))  # fmt: skip
    return train_config(**{**fields, **overrides})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


# --- building blocks ------------------------------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    kw = dict(warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, decay_progress=0.0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, decay_progress=0.0, **kw) == pytest.approx(1e-3)
    assert lr_at(10, decay_progress=0.0, **kw) == pytest.approx(1e-3)
    assert lr_at(50, decay_progress=0.5, **kw) == pytest.approx(5.5e-4)
    assert lr_at(99, decay_progress=1.0, **kw) == pytest.approx(1e-4)
    assert lr_at(99, decay_progress=1.7, **kw) == pytest.approx(1e-4)  # clamped past the budget


def test_optimizer_decays_2d_weights_only_and_holds_the_tied_head_once():
    model = GPT(TINY)
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert opt.defaults["foreach"] is True


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(TINY)
    opt = configure_optimizer(
        model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu", optimizer="muon", muon_lr=0.02
    )
    assert isinstance(opt, OptimizerGroup)
    adamw, muon = opt.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in n}
    decayed = {names[id(p)] for p in adamw.param_groups[0]["params"]}
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}  # the tied head is wte
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert [g["kind"] for g in opt.param_groups] == ["decay", "no_decay", "muon"]
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0, pytest.approx(20.0)]
    # a step moves every parameter, and the state round-trips through state_dict
    model(torch.randint(0, TINY.vocab_size, (2, 8))).float().square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    again = configure_optimizer(
        model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu", optimizer="muon", muon_lr=0.02
    )
    again.load_state_dict(opt.state_dict())
    assert torch.equal(
        again.optimizers[1].state_dict()["state"][0]["momentum_buffer"],
        opt.optimizers[1].state_dict()["state"][0]["momentum_buffer"],
    )


# --- training -------------------------------------------------------------------------------------


def test_loss_falls_and_the_run_writes_metrics_plot_and_checkpoints(tmp_path, corpus):
    result = train(tiny(tmp_path, corpus, max_steps=24, eval_interval=12), progress=False)
    run = tmp_path / "run"
    events = records(run)
    evals = [r for r in events if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5  # from ~ln(50257) = 10.8
    assert [r["step"] for r in events if r["event"] == "train"] == list(range(1, 25))
    assert events[-1]["event"] == "end" and events[-1]["stopped_by"] == "max_steps"
    assert all(isinstance(r["sample"], str) for r in evals)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert result.steps == 24 and result.tokens == 24 * 4 * 32 and result.stopped_by == "max_steps"
    assert result.val_loss == pytest.approx(evals[-1]["val_loss"])
    assert result.best_val_loss == min(r["val_loss"] for r in evals)
    assert result.val_bpb == pytest.approx(evals[-1]["val_bpb"])
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.config == TINY
    assert ckpt.meta["step"] == 24 and ckpt.meta["tokens_seen"] == 24 * 128 and ckpt.meta["tokenizer"] == "gpt2"
    assert ckpt.meta["val_loss"] == pytest.approx(result.val_loss)
    assert TrainConfig.from_dict(ckpt.meta["train_config"]) == tiny(tmp_path, corpus, max_steps=24, eval_interval=12)
    assert load_checkpoint(result.best_checkpoint).meta["val_loss"] == pytest.approx(result.best_val_loss)
    assert load_train_state(result.best_checkpoint) == (None, None)  # best is for inference only


@pytest.mark.parametrize(("optimizer", "dtype"), [("muon", "float32"), ("adamw", "float32"), ("muon", "float16")])
def test_resume_continues_exactly_where_the_run_was_interrupted(tmp_path, corpus, monkeypatch, optimizer, dtype):
    """8 steps straight == 4 steps, the checkpoint at step 4, resume, 4 more: identical weights. float16 is the
    path of GPUs without bf16 (a T4, a V100): a GradScaler, whose scale and growth count resume too."""
    snapshot = tmp_path / "snapshot"
    real_save = train_mod.save_checkpoint

    def save_and_snapshot(path, **kw):
        out = real_save(path, **kw)
        if Path(path).name == "last" and kw["meta"]["step"] == 4:
            shutil.copytree(path, snapshot)  # what a run killed after step 4 leaves behind
        return out

    monkeypatch.setattr(train_mod, "save_checkpoint", save_and_snapshot)
    straight = train(tiny(tmp_path, corpus, optimizer=optimizer, dtype=dtype), progress=False)
    assert snapshot.exists()

    (tmp_path / "resumed").mkdir()
    shutil.copytree(snapshot, tmp_path / "resumed" / "last")
    resumed_config = tiny(
        tmp_path, corpus, run_dir=str(tmp_path / "resumed"), resume=True, optimizer=optimizer, dtype=dtype
    )
    resumed = train(resumed_config, progress=False)
    assert resumed.steps == straight.steps == 8 and resumed.tokens == straight.tokens
    a, b = weights(straight.last_checkpoint), weights(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val_loss == straight.val_loss
    steps = [r["step"] for r in records(tmp_path / "resumed") if r["event"] == "train"]
    assert steps == [5, 6, 7, 8]
    scalers = [load_train_state(p)[1]["scaler"] for p in (snapshot, straight.last_checkpoint, resumed.last_checkpoint)]
    if dtype == "float32":
        assert scalers == [None] * 3
    else:  # saved at step 4, and the resumed run's at step 8 is the straight run's
        assert scalers[0]["scale"] > 0 and scalers[1] == scalers[2]
        assert scalers[2]["_growth_tracker"] == scalers[0]["_growth_tracker"] + 4  # 4 more steps, none overflowed


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver `signum` to this process right after optimizer step `step` (as Ctrl-C or `docker stop` would)."""
    import signal as signal_mod

    real_step = train_mod._Run._step

    def step_then_signal(self, lr, bar):  # noqa: ANN001, ANN202
        real_step(self, lr, bar)
        if self.step == step:
            signal_mod.raise_signal(signum)

    monkeypatch.setattr(train_mod._Run, "_step", step_then_signal)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_between_steps_and_resume_is_exact(tmp_path, corpus, monkeypatch, signame):
    """Ctrl-C used to save mid-step (batches drawn, AdamW half applied: resume was not exact); SIGTERM saved
    nothing. Both now stop at the next step boundary and save there."""
    import signal as signal_mod

    straight = train(tiny(tmp_path, corpus, log_interval=4), progress=False)
    with monkeypatch.context() as m:
        _signal_at(m, 6, getattr(signal_mod, signame))
        stopped = train(tiny(tmp_path, corpus, run_dir=str(tmp_path / "stopped"), log_interval=4), progress=False)
    assert (stopped.stopped_by, stopped.steps) == ("interrupted", 6)
    assert stopped.stop_signal == getattr(signal_mod, signame) and straight.stop_signal is None
    # its validation loss is step 4's, and says so (the meta and the summary gave it as the step-6 model's)
    assert stopped.val_step == 4 and "bpb, at step 4), " in stopped.summary() and "at step" not in straight.summary()
    assert load_checkpoint(stopped.last_checkpoint).meta["val_step"] == 4
    assert load_checkpoint(stopped.last_checkpoint).meta["step"] == 6
    assert signal_mod.getsignal(signal_mod.SIGINT) is signal_mod.default_int_handler  # handlers given back
    resumed = train(
        tiny(tmp_path, corpus, run_dir=str(tmp_path / "stopped"), resume=True, log_interval=4), progress=False
    )
    a, b = weights(straight.last_checkpoint), weights(resumed.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.val_loss == straight.val_loss
    evals = [r["step"] for r in records(tmp_path / "stopped") if r["event"] == "eval"]
    assert evals == [r["step"] for r in records(straight.run_dir) if r["event"] == "eval"] == [0, 4, 8]
    # the step-8 line averages steps 5-8 though the run stopped at 6: the same number as the straight run's
    losses = [
        [(r["step"], r["loss"]) for r in records(run) if r["event"] == "train"]
        for run in (straight.run_dir, tmp_path / "stopped")
    ]
    assert losses[0] == losses[1] and [step for step, _ in losses[0]] == [4, 8]


def test_a_malformed_train_state_is_one_clear_error(tmp_path, corpus):
    train(tiny(tmp_path, corpus, max_steps=2), progress=False)
    path = tmp_path / "run" / "last" / "train_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "step": "x"}))
    with pytest.raises(TrainError, match="its training state is malformed \\(ValueError"):
        train(tiny(tmp_path, corpus, max_steps=4, resume=True), progress=False)


def test_resuming_a_finished_run_keeps_its_validation_loss(tmp_path, corpus):
    first = train(tiny(tmp_path, corpus), progress=False)
    again = train(tiny(tmp_path, corpus, resume=True), progress=False)  # nothing left to do
    assert again.steps == 8 and again.val_loss == first.val_loss  # was nan (and NaN in metrics.jsonl)
    assert all(math.isfinite(r.get("val_loss", 0.0)) for r in records(first.run_dir))


def test_a_fresh_run_replaces_the_earlier_runs_checkpoints_once_it_saves(tmp_path, corpus, monkeypatch):
    """The earlier run's best/ survived, and was what evaluate/generate/serve loaded, until the new run's first
    improving evaluation (for good when it stopped before one); deleting it at the start instead lost a trained
    model whenever the rerun died before its first save. It waits in previous/ until then."""
    train(tiny(tmp_path, corpus, max_steps=4), progress=False)
    run = tmp_path / "run"
    assert (run / "best").exists()
    trained = weights(run / "last")

    def crash(self, **kwargs):  # noqa: ANN001, ANN003, ANN202 (the rerun dies at its first evaluation)
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(train_mod._Run, "evaluate", crash)
        with pytest.raises(RuntimeError, match="killed"):
            train(tiny(tmp_path, corpus, max_steps=4, seed=5), progress=False)
    assert not (run / "best").exists() and not (run / "last").exists()  # nothing stale is served as this run
    assert set(os.listdir(run / "previous")) == {"best", "last", "metrics.jsonl", "loss.png"}
    kept = weights(run / "previous" / "last")
    assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in trained)
    with pytest.raises(TrainError, match=r"the run before is in .*previous .*move its best/, last/ and metrics"):
        train(tiny(tmp_path, corpus, resume=True), progress=False)

    # another recipe is still refused: the run set aside is the one it would replace
    other = tmp_path / "other.txt"
    other.write_text("other words entirely. " * 400)
    with pytest.raises(TrainError, match="holds a run of another recipe"):
        train(tiny(tmp_path, corpus, data=(str(other),)), progress=False)
    # a resume of a run whose metrics.jsonl is gone moves nothing aside
    train(tiny(tmp_path, corpus, max_steps=4, run_dir=str(tmp_path / "solo")), progress=False)
    (tmp_path / "solo" / "metrics.jsonl").unlink()
    train(tiny(tmp_path, corpus, max_steps=6, run_dir=str(tmp_path / "solo"), resume=True), progress=False)
    assert (tmp_path / "solo" / "best").is_dir() and not (tmp_path / "solo" / "previous").exists()

    def rerun_stopped_at_step_1(trained_steps: int) -> None:  # Ctrl-C on a rerun by mistake: the run before stays
        with monkeypatch.context() as m:
            _signal_at(m, 1, __import__("signal").SIGINT)
            again = train(tiny(tmp_path, corpus, max_steps=4), progress=False)
        assert again.stopped_by == "interrupted" and not (run / "best").exists()
        assert load_checkpoint(run / "last").meta["step"] == 1
        assert load_checkpoint(run / "previous" / "last").meta["step"] == trained_steps  # the trained run, still
        assert find_checkpoint(run) == run / "previous" / "best"  # and what generate / serve load meanwhile

    from tinyllm.checkpoint import find_checkpoint

    rerun_stopped_at_step_1(4)
    rerun_stopped_at_step_1(4)  # a second stopped rerun replaces the first one's leftovers, not the trained run
    # --resume of the stopped rerun: its first evaluation replaces the run before, as a fresh rerun's does
    resumed = train(tiny(tmp_path, corpus, max_steps=3, eval_interval=2, resume=True), progress=False)
    assert resumed.steps == 3 and not (run / "previous").exists() and find_checkpoint(run) == run / "best"
    rerun_stopped_at_step_1(3)
    finished = train(tiny(tmp_path, corpus, max_steps=2, eval_interval=1), progress=False)
    assert finished.steps == 2 and not (run / "previous").exists()  # saved at an evaluation: the run before is gone
    # an --overwrite run of another recipe, stopped: the run it set aside is what a third run is checked against
    with monkeypatch.context() as m:
        _signal_at(m, 1, __import__("signal").SIGINT)
        train(tiny(tmp_path, corpus, data=(str(other),), overwrite=True, max_steps=4), progress=False)
    with pytest.raises(TrainError, match="holds a run of another recipe"):
        train(tiny(tmp_path, corpus, data=(str(other),)), progress=False)
    # out of budget at step 0: no untrained best/, and the run before stays
    zero = train(tiny(tmp_path, corpus, max_steps=None, max_minutes=1e-6), progress=False)
    assert zero.steps == 0 and not (run / "best").exists() and (run / "previous" / "best").is_dir()


def test_setting_a_run_aside_is_all_or_nothing(tmp_path, monkeypatch):
    """A Ctrl-C (or an OS error) halfway left the run in a hidden staging directory nothing reads."""
    run = tmp_path / "run"
    for name in ("best", "last"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_text(name)
    (run / "metrics.jsonl").write_text("{}\n")
    real, calls = os.replace, []

    def interrupted(src, dst):  # noqa: ANN001, ANN202
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod._set_aside(run, run / "previous", ("best", "last", "metrics.jsonl"))
    monkeypatch.setattr(os, "replace", real)
    assert sorted(os.listdir(run)) == ["best", "last", "metrics.jsonl"]  # all back; no staging directory
    assert (run / "best" / "model.safetensors").read_text() == "best"


def test_a_diverging_run_stops_with_a_clear_error(tmp_path, corpus):
    with pytest.raises(TrainError, match="training diverged at step .*lower --lr"):
        train(tiny(tmp_path, corpus, optimizer="adamw", lr=1e4, warmup_steps=0, max_steps=20), progress=False)
    with pytest.raises(TrainError, match="lr must be a finite number, got inf"):
        train_config(lr=math.inf)


def test_max_tokens_stops_at_the_last_whole_step_within_the_budget(tmp_path, corpus):
    result = train(tiny(tmp_path, corpus, max_steps=None, max_tokens=5 * 128 + 100, eval_interval=100), progress=False)
    assert (result.steps, result.tokens, result.stopped_by) == (5, 640, "max_tokens")


def test_the_first_budget_reached_rules(tmp_path, corpus):
    result = train(tiny(tmp_path, corpus, max_steps=3, max_tokens=10_000, eval_interval=100), progress=False)
    assert (result.steps, result.stopped_by) == (3, "max_steps")


def test_max_minutes_stops_within_the_wall_clock_budget(tmp_path, corpus):
    budget_s = 2.0
    cfg = tiny(tmp_path, corpus, max_steps=None, max_minutes=budget_s / 60, eval_interval=1000)
    result = train(cfg, progress=False)
    assert result.stopped_by == "max_minutes"
    assert result.seconds <= budget_s + 1.0  # the final evaluation and checkpoint are inside the budget
    assert load_checkpoint(result.last_checkpoint).meta["step"] == result.steps


def test_a_budget_spent_before_the_first_step_warns_that_the_model_is_untrained(tmp_path, corpus, caplog):
    cfg = tiny(tmp_path, corpus, max_steps=None, max_minutes=1e-6, eval_interval=1000)
    with caplog.at_level(logging.WARNING, logger="tinyllm.train"):
        result = train(cfg, progress=False)
    assert (result.steps, result.stopped_by) == (0, "max_minutes")
    assert "ran out before the first step" in caplog.text and "untrained" in caplog.text


def test_with_a_time_budget_the_lr_schedule_and_evaluations_follow_the_clock(tmp_path, corpus, monkeypatch):
    """A fake clock (0.05 s per reading): the run stops by time, its last steps have a decayed LR, and it
    evaluates (and checkpoints) every `eval_minutes` although no step count says so."""

    class FakeTime:
        now = 0.0

        @classmethod
        def perf_counter(cls) -> float:
            cls.now += 0.05
            return cls.now

    monkeypatch.setattr(train_mod, "time", FakeTime)
    cfg = tiny(tmp_path, corpus, max_steps=None, max_minutes=0.1, eval_interval=1000, eval_minutes=0.025)
    result = train(cfg, progress=False)
    lrs = [r["lr"] for r in records(tmp_path / "run") if r["event"] == "train"]
    evals = [r for r in records(tmp_path / "run") if r["event"] == "eval"]
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in itertools.pairwise(evals[:-1])]  # the last one ends the run
    assert len(evals) >= 4 and min(gaps) >= 1.5
    assert result.stopped_by == "max_minutes" and len(lrs) > 10
    assert result.seconds <= 6.0 + 0.2  # the final checkpoint's few clock readings were not foreseen
    assert lrs[1] == pytest.approx(cfg.lr)  # end of warmup
    assert lrs[-1] < 0.2 * cfg.lr and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


# --- distributed and fine-tuning ----------------------------------------------------------------


def test_torchrun_two_processes_train_with_ddp_and_rank0_writes_one_checkpoint(tmp_path, corpus, tinyllm_home):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(tmp_path / "torchrun"), "-m", "tinyllm", "train", "--data", str(corpus),
           "--preset", "seed", "--block-size", "16", "--batch-size", "2",
           "--max-steps", "4", "--eval-interval", "2", "--eval-iters", "2", "--device", "cpu", "--run-dir", str(run),
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "TINYLLM_HOME": str(tinyllm_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 4 steps") == 1  # rank 0 alone reports
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "loss.png", "metrics.jsonl"]
    ckpt = load_checkpoint(run / "last")
    assert ckpt.meta["step"] == 4 and ckpt.meta["tokens_seen"] == 4 * 2 * 16 * 2  # both ranks' tokens
    _, state = load_train_state(run / "last")
    assert state["world_size"] == 2 and [r["sampler"]["seed"] for r in state["ranks"]] == [1337, 1338]
    assert [r["step"] for r in records(run) if r["event"] == "eval"] == [0, 2, 4]  # written once, not per rank


def _muon_params_and_grads() -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Six matrices of different shapes, each with three steps' gradients (the same in every process)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128), (64, 48), (48, 64)]
    return [(torch.randn(s, generator=gen), [torch.randn(s, generator=gen) for _ in range(3)]) for s in shapes]


def _run_muon(params_and_grads, make) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [torch.nn.Parameter(p.clone()) for p, _ in params_and_grads]
    opt = make(params)
    for step in range(3):
        for param, (_, grads) in zip(params, params_and_grads, strict=True):
            param.grad = grads[step].clone()
        opt.step()
    return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params]


def _sharded_muon_rank(rank: int, port: int, results) -> None:  # noqa: ANN001
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        settings = dict(lr=0.02, momentum=0.95, weight_decay=0.05, adjust_lr_fn="original")
        pg = _muon_params_and_grads()
        sharded = _run_muon(pg, lambda ps: ShardedMuon(ps, world=2, rank=rank, **settings))
        if rank == 0:
            reference = _run_muon(pg, lambda ps: torch.optim.Muon(ps, **settings))
            pairs = [ab for x, y in zip(sharded, reference, strict=True) for ab in zip(x, y, strict=True)]
            results.put(all(torch.equal(a, b) for a, b in pairs))
        dist.barrier()  # as the trainer does: a rank tearing gloo down while its peer still works can abort
    finally:
        dist.destroy_process_group()


def test_sharded_muon_in_two_processes_equals_muon_in_one():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_sharded_muon_rank, args=(port, results), nprocs=2, start_method="spawn")
    assert results.get() is True  # same parameters and momentum buffers, bit for bit


def test_the_default_recipe_runs_one_process_per_core_on_a_cpu(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(train_mod, "usable_cores", lambda: 2)
    assert resolve_processes(TrainConfig(device="cpu")) == 2
    monkeypatch.setattr(train_mod, "usable_cores", lambda: 16)
    assert resolve_processes(TrainConfig(device="cpu")) == 4  # MAX_AUTO_PROCESSES
    monkeypatch.setattr(train_mod, "usable_cores", lambda: 1)
    assert resolve_processes(TrainConfig(device="cpu")) == 1
    assert TrainConfig().processes_spec == "auto" and TrainConfig(processes=3).processes_spec == 3
    assert TrainConfig(preset="seed").processes_spec == 1 and TrainConfig(model=TINY).processes_spec == 1
    assert finetune_config(init_from="gpt2", data=["x"]).processes_spec == 1
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_processes(TrainConfig(processes=2)) == 1  # under torchrun: its processes, none of ours


def test_train_spawns_ddp_processes_and_returns_rank0s_result(tmp_path, corpus, monkeypatch):
    result = train(tiny(tmp_path, corpus, processes=2, max_steps=4, eval_interval=2), progress=False)
    run = tmp_path / "run"
    assert result.rank == 0 and result.steps == 4 and result.tokens == 4 * 4 * 32 * 2  # both processes' tokens
    ckpt = load_checkpoint(run / "last")
    assert ckpt.meta["step"] == 4 and ckpt.meta["val_loss"] == pytest.approx(result.val_loss)
    _, state = load_train_state(run / "last")
    assert state["world_size"] == 2 and [r["sampler"]["seed"] for r in state["ranks"]] == [1337, 1338]
    assert [r["step"] for r in records(run) if r["event"] == "eval"] == [0, 2, 4]
    # a process's error comes back as one clear TrainError, and the other process is stopped; the tracebacks
    # torch's spawn left in temporary files are removed
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(TrainError, match="no such file or folder"):
        train(tiny(tmp_path, corpus, processes=2, data=(str(tmp_path / "nope.txt"),)), progress=False)
    assert list(scratch.glob("pytorch-errorfile-*")) == []


def test_sigterm_to_the_spawning_process_stops_its_processes_with_a_checkpoint(tmp_path, corpus):
    """`kill`/`timeout`/`docker stop` signal the process that spawned the DDP processes: they used to train on
    as orphans (and SIGINT saved nothing under DDP)."""
    import signal as signal_mod
    import threading
    import time

    metrics = tmp_path / "run" / "metrics.jsonl"

    def signal_once_training() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and '"event": "train"' in metrics.read_text():
                os.kill(os.getpid(), signal_mod.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=signal_once_training, daemon=True).start()
    config = tiny(tmp_path, corpus, processes=2, max_steps=100_000, eval_interval=100_000)
    result = train(config, progress=False)
    assert result.stopped_by == "interrupted" and 0 < result.steps < 100_000
    _, state = load_train_state(tmp_path / "run" / "last")
    assert state["step"] == result.steps and state["world_size"] == 2


@pytest.mark.parametrize("rank0_finished", [True, False])
def test_a_process_dying_after_rank0_finished_does_not_fail_the_run(tmp_path, corpus, monkeypatch, rank0_finished):
    """gloo can abort a process in its teardown; once rank 0 has published its result the run stands."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    sentinel = "rank 0's result"  # through a real queue: pickled

    class Context:
        error_files = [None, None]

        def join(self) -> bool:
            raise ProcessExitedException("process 1 terminated with signal SIGABRT", 1, 4242, -6, "SIGABRT")

    def start_processes(fn, args, nprocs, join, start_method):  # noqa: ANN001, ANN202
        if rank0_finished:
            args[-1].put(("result", 0, sentinel))
        return Context()

    train(tiny(tmp_path, corpus, max_steps=1, eval_interval=1), progress=False)  # a checkpoint the run left
    monkeypatch.setattr(mp, "start_processes", start_processes)
    config = tiny(tmp_path, corpus, processes=2)
    if rank0_finished:
        assert train(config, progress=False) == sentinel
    else:  # what died, and that the checkpoint there survived
        hint = r"run/last holds step 1: the same command with --resume continues"
        with pytest.raises(TrainError, match=f"process 1 terminated with signal SIGABRT; .*{hint}"):
            train(config, progress=False)


def test_a_collective_failing_because_a_peer_died_reads_as_such():
    """Under torchrun, a killed rank showed the others a gloo traceback; they now stop with one line."""
    import torch.distributed as dist

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:50370: Connection reset by peer")
    assert train_mod._peer_gone(gone) and train_mod._peer_gone(dist.DistBackendError("NCCL communicator aborted"))
    assert not train_mod._peer_gone(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    closed = "[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:21201. This is typically..."
    assert train_mod._peer_reason(RuntimeError(closed)) == "Connection closed by peer [127.0.0.1]:21201"


def test_a_finetune_resumes_whatever_the_spelling_of_its_starting_point(tmp_path, corpus, monkeypatch):
    """`--from` was recorded as typed: resuming with './base' or from another directory failed."""
    from tinyllm.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", model=GPT(TINY))
    monkeypatch.chdir(tmp_path)
    fields = dict(data=(str(corpus),), max_steps=2, eval_interval=2, eval_iters=1, batch_size=4, device="cpu",
                  run_dir=str(tmp_path / "ft"), sample_tokens=2, max_minutes=None)  # fmt: skip
    first = finetune(init_from="base", progress=False, **fields)
    assert load_checkpoint(first.last_checkpoint).meta["train_config"]["init_from"] == str(tmp_path / "base")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = finetune(init_from="../base", progress=False, **{**fields, "max_steps": 3, "resume": True})
    assert resumed.steps == 3
    shutil.rmtree(tmp_path / "base")  # last/ holds all a resume needs: the same options, as typed, still resume
    monkeypatch.chdir(tmp_path)
    again = finetune(init_from="base", progress=False, **{**fields, "max_steps": 4, "resume": True})
    assert again.steps == 4
    # `train --resume` on a fine-tune (or `finetune --resume` on a run from scratch) says which command continues it
    with pytest.raises(TrainError, match=r"it is a fine-tune of .*base; continue it with `tinyllm finetune --from"):
        train(tiny(tmp_path, corpus, data=fields["data"], run_dir=fields["run_dir"], resume=True), progress=False)
    train(tiny(tmp_path, corpus, max_steps=1, eval_interval=1, eval_iters=1), progress=False)
    with pytest.raises(TrainError, match="trained from scratch, not fine-tuned from .*`tinyllm train --run-dir"):
        finetune(init_from="base", progress=False, **{**fields, "run_dir": str(tmp_path / "run"), "resume": True})


def test_finetune_from_a_local_gpt2_directory(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp_path / "tiny-gpt2"
    hf_cfg = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(hf_dir)

    result = finetune(init_from=str(hf_dir), data=[corpus], val_fraction=0.25, batch_size=4, block_size=64, lr=3e-3,
                      max_minutes=None, max_steps=16, eval_interval=8, eval_iters=2, sample_tokens=4, device="cpu",
                      run_dir=str(tmp_path / "ft"), progress=False)  # fmt: skip
    evals = [r for r in records(tmp_path / "ft") if r["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    ckpt = load_checkpoint(result.last_checkpoint)
    assert ckpt.config.n_embd == 32 and ckpt.config.block_size == 32  # block_size 64 capped at the model's
    assert ckpt.meta["run"] == "finetune" and ckpt.meta["init_from"] == str(hf_dir)
    assert ckpt.meta["train_config"]["warmup_steps"] == 10  # the fine-tuning recipe under the overrides
    assert result.tokens == 16 * 4 * 32


# --- clear errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(preset="huge"), "unknown preset 'huge'"),
        (dict(max_minutes=None), "set a budget"),
        (dict(lr=1e-3, min_lr=1e-2), "min_lr must be in"),
        (dict(dtype="int8"), "unknown dtype"),
        (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
        (dict(muon_lr=0), "muon_lr must be positive"),
        (dict(processes=0), "processes must be a positive integer or 'auto'"),
        (dict(processes="all"), "processes must be a positive integer or 'auto'"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63\)"),
        (dict(seed=10**20), r"seed must be an integer in \[0, 2\*\*63\)"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number, got nan"),  # trained, then "diverged"
        (dict(muon_lr=float("inf")), "muon_lr must be a finite number, got inf"),
        (dict(grad_clip=float("nan")), "grad_clip must be a finite number"),
    ],
)
def test_bad_options_raise_one_clear_train_error(fields, message):
    with pytest.raises(TrainError, match=message):
        train_config(**fields)


def test_missing_data_and_too_small_budgets_fail_clearly(tmp_path, corpus):
    with pytest.raises(CorpusError, match="no such file or folder"):
        train(tiny(tmp_path, corpus, data=(str(tmp_path / "nope.txt"),)), progress=False)
    with pytest.raises(TrainError, match="less than one step's 128 tokens"):
        train(tiny(tmp_path, corpus, max_steps=None, max_tokens=100), progress=False)
    with pytest.raises(TrainError, match="fine-tuning needs data"):
        finetune(init_from="gpt2", data=[])


def test_a_finetune_that_only_made_things_worse_says_so(tmp_path, corpus, caplog):
    """Step 0 (the starting weights) never counts as best, so best/ can hold a worse model than --from."""
    train(tiny(tmp_path, corpus, run_dir=str(tmp_path / "base")), progress=False)
    fields = dict(data=[corpus], val_fraction=0.25, batch_size=4, warmup_steps=0, max_steps=2, eval_interval=2,
                  eval_iters=2, device="cpu", max_minutes=None, optimizer="adamw", sample_tokens=2)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="tinyllm.train"):
        bad = finetune(init_from=str(tmp_path / "base"), lr=2.0, run_dir=str(tmp_path / "bad"), **fields)
    assert "no evaluation beat the starting model" in caplog.text and "lower --lr (now 2)" in caplog.text
    assert bad.best_val_loss > records(tmp_path / "bad")[0]["val_loss"]  # the step-0 evaluation
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tinyllm.train"):
        finetune(init_from=str(tmp_path / "base"), lr=3e-3, run_dir=str(tmp_path / "good"), **fields)
    assert "no evaluation beat" not in caplog.text


def test_a_finetune_may_not_write_over_the_checkpoint_it_starts_from(tmp_path, corpus):
    """`finetune --from X --run-dir X --overwrite` deleted X before loading it."""
    from tinyllm.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "base" / "best", model=GPT(TINY))
    for start in ("base", "base/best"):
        with pytest.raises(TrainError, match="lies in --run-dir"):
            finetune(init_from=str(tmp_path / start), data=[corpus], run_dir=str(tmp_path / "base"), overwrite=True)
    assert (tmp_path / "base" / "best" / "model.safetensors").is_file()


def test_a_run_of_another_recipe_is_not_replaced_without_overwrite(tmp_path, corpus, monkeypatch):
    """`tinyllm train --data notes/` (the README's example) replaced the default model in runs/default."""
    first = train(tiny(tmp_path, corpus, max_steps=1), progress=False)
    trained = weights(first.last_checkpoint)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("Some other words for the model to learn. " * 200)
    monkeypatch.chdir(tmp_path)  # a relative path, recorded as an absolute one
    with pytest.raises(TrainError, match=r"holds a run of another recipe \(data .*; pass --run-dir DIR .*--overwrite"):
        train(tiny(tmp_path, corpus, data=("other",), max_steps=1), progress=False)
    wider = ModelConfig(block_size=32, n_layer=1, n_head=2, n_embd=64)
    with pytest.raises(TrainError, match="another recipe \\(a 1-layer, 32-wide model\\)"):
        train(tiny(tmp_path, corpus, model=wider, max_steps=1), progress=False)
    assert all(
        torch.equal(a, b) for a, b in zip(trained.values(), weights(first.last_checkpoint).values(), strict=True)
    )
    again = train(tiny(tmp_path, corpus, max_steps=2), progress=False)  # the same recipe again: replaced
    assert again.steps == 2
    replaced = train(tiny(tmp_path, corpus, data=("other",), max_steps=1, overwrite=True), progress=False)
    meta = json.loads((replaced.last_checkpoint / "meta.json").read_text())
    assert meta["train_config"]["data"] == [str(other)]  # evaluating it from elsewhere finds the same data


def test_the_recipe_guard_also_covers_a_run_with_only_best_and_gpt2_names_stay_names(tmp_path, corpus, monkeypatch):
    """Review findings: a directory holding only best/ (what the Docker build leaves) was replaced unguarded; a
    folder named gpt2 in the working directory turned --from gpt2 into a local path."""
    first = train(tiny(tmp_path, corpus, max_steps=4), progress=False)
    shutil.rmtree(first.last_checkpoint)
    other = tmp_path / "other.txt"
    other.write_text("Other words entirely, for another recipe. " * 200)
    with pytest.raises(TrainError, match="holds a run of another recipe"):
        train(tiny(tmp_path, corpus, data=(str(other),), max_steps=1), progress=False)
    assert (tmp_path / "run" / "best").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert train_mod._absolute_init("gpt2") == "gpt2" and train_mod._absolute_init("run") == str(tmp_path / "run")


def test_tinyllm_run_stopped_while_training_does_not_serve(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from tinyllm.server import app as server_app

    monkeypatch.setattr(train_mod, "train_default", lambda **kw: SimpleNamespace(stopped_by="interrupted"))
    monkeypatch.setattr(server_app, "serve", lambda *a, **kw: pytest.fail("served a half-trained model"))
    assert main(["run", "--run-dir", str(tmp_path / "r"), "--minutes", "1"]) == 130


def test_resume_needs_a_matching_checkpoint(tmp_path, corpus, caplog):
    with pytest.raises(TrainError, match="cannot resume: no checkpoint at .*last"):
        train(tiny(tmp_path, corpus, resume=True), progress=False)
    train(tiny(tmp_path, corpus, max_steps=1), progress=False)
    wider = dataclasses.replace(TINY, n_embd=TINY.n_embd * 2)
    with pytest.raises(TrainError) as info:
        train(tiny(tmp_path, corpus, model=wider, resume=True, max_steps=2), progress=False)
    assert f"its model differs: n_embd {TINY.n_embd} (this run: {TINY.n_embd * 2}); it was trained with --preset" in (
        str(info.value)
    )
    # other recipe options are this run's, and it says the continuation is no longer the original's
    train(tiny(tmp_path, corpus, resume=True, max_steps=2, batch_size=2, seed=7), progress=False)
    assert "resuming with batch_size 2 (was 4), seed 7 (was 1337): the run goes on, but not as" in caplog.text
    with pytest.raises(TrainError, match="optimizer state does not fit --optimizer adamw"):
        train(tiny(tmp_path, corpus, optimizer="adamw", resume=True, max_steps=2), progress=False)
    # a resumed run keeps the saved state but takes this run's settings
    train(tiny(tmp_path, corpus, resume=True, max_steps=3, weight_decay=0.2, muon_weight_decay=0.3), progress=False)
    opt_state, _ = load_train_state(tmp_path / "run" / "last")
    adamw, muon = opt_state["optimizers"]
    assert [g["weight_decay"] for g in adamw["param_groups"]] == [0.2, 0.0]
    assert muon["param_groups"][0]["weight_decay"] == 0.3 and muon["state"]


def test_cli_reports_bad_options_in_one_line_with_exit_code_2(tmp_path, corpus, capsys):
    assert main(["train", "--batch-size", "0", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "tinyllm train: error: batch_size must be a positive integer, got 0"
    assert main(["train", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--max-steps", "1", "--no-progress"]) == 2
    assert "missing.txt: no such file or folder" in capsys.readouterr().err
    assert main(["train", "--resume", "--data", str(corpus), "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "cannot resume: no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--data", str(corpus)])  # --from is required
    assert exc.value.code == 2


def test_cli_train_runs_a_budgeted_job(tmp_path, corpus, capsys):
    run = tmp_path / "cli"
    argv = ["train", "--preset", "seed", "--data", str(corpus), "--block-size", "16", "--batch-size", "2",
            "--max-steps", "2", "--eval-iters", "1", "--device", "cpu", "--run-dir", str(run),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    meta = load_checkpoint(run / "last").meta
    assert meta["step"] == 2 and meta["train_config"]["max_minutes"] is None  # a given budget replaces 10 min
    assert math.isfinite(meta["val_bpb"])


def test_errors_are_tinyllm_errors():
    assert issubclass(TrainError, TinyLLMError)


def scene_corpus(tmp_path: Path) -> Path:
    """Four small documents, enough to train a few-hundred-token BPE on."""
    corpus = tmp_path / "bpe-corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(f"Scene {i}. The king speaks to the queen of the realm.\n" * 60)
    return corpus


def bpe_config(tmp_path: Path, corpus: Path, *, tokenizer: str) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=32),
        data=(str(corpus),),
        tokenizer=tokenizer,
        batch_size=2,
        max_steps=2,
        eval_interval=2,
        eval_iters=1,
        run_dir=str(tmp_path / "run"),
        sample_tokens=4,
    )


def test_train_with_a_trained_tokenizer_stores_it_and_serves_it(tinyllm_home, tmp_path):
    """A corpus-trained BPE becomes the model's vocabulary and travels inside its checkpoint."""
    from tinyllm.checkpoint import load_checkpoint, resolve_model, tokenizer_from_meta
    from tinyllm.data import train_tokenizer

    corpus = scene_corpus(tmp_path)
    tok = train_tokenizer([corpus], vocab_size=300)
    train(bpe_config(tmp_path, corpus, tokenizer=tok.name), progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last")
    assert ckpt.config.vocab_size == tok.vocab_size and ckpt.meta["tokenizer"] == tok.name
    assert (tmp_path / "run" / "last" / "tokenizer.json").exists()
    _, meta = resolve_model(str(tmp_path / "run"))
    assert tokenizer_from_meta(meta).encode("The king") == tok.encode("The king")


def test_a_bpe_spec_trains_the_tokenizer_once_per_corpus(tinyllm_home, tmp_path, monkeypatch):
    """tokenizer="bpe:N": trained on the run's training split, then found again without training."""
    from tinyllm import data as data_mod

    corpus = scene_corpus(tmp_path)
    train(bpe_config(tmp_path, corpus, tokenizer="bpe:290"), progress=False)
    trained = data_mod.train_tokenizer([corpus], vocab_size=290)  # what the spec means
    ckpt = load_checkpoint(tmp_path / "run" / "last")
    assert ckpt.meta["tokenizer"] == trained.name and ckpt.config.vocab_size == 290

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(data_mod, "train_tokenizer", no_training)
    assert data_mod.tokenizer_for("bpe:290", [corpus]).name == trained.name
    (corpus / "d0.txt").write_text("Another scene entirely, with other words.\n" * 40)  # new content: a new BPE
    with pytest.raises(AssertionError, match="trained again"):
        data_mod.tokenizer_for("bpe:290", [corpus])


def test_the_default_recipe_trains_its_own_bpe_and_the_seed_preset_keeps_gpt2():
    assert TrainConfig().tokenizer_spec == "bpe:4096"
    assert TrainConfig(preset="seed").tokenizer_spec == "gpt2"
    assert TrainConfig(model=TINY).tokenizer_spec == "gpt2"
    assert TrainConfig(tokenizer="gpt2").tokenizer_spec == "gpt2"
    assert TrainConfig().optimizer == "muon" and finetune_config(init_from="gpt2", data=["x"]).optimizer == "adamw"


def test_the_default_recipe_runs_end_to_end_on_the_built_in_corpus(tinyllm_home, gpt2_tokenizer, tmp_path):
    """What `make run` trains: 3 x 256, its own 4096-token BPE trained on the split, Muon + AdamW, bf16 or fp32."""
    from tinyllm.checkpoint import resolve_model, tokenizer_from_meta
    from tinyllm.train import default_config

    if not (tinyllm_home / "assets" / "shakespeare").exists():
        pytest.skip("the built-in corpus is not fetched; run `tinyllm fetch-assets`")
    config = default_config(run_dir=tmp_path / "run", max_steps=3, eval_iters=1, sample_tokens=4, device="cpu")
    result = train(config, progress=False)
    ckpt = load_checkpoint(result.last_checkpoint)
    assert (ckpt.config.n_layer, ckpt.config.n_embd, ckpt.config.block_size) == (3, 256, 256)
    assert ckpt.config.vocab_size == 4096 and ckpt.meta["tokenizer"].startswith("bpe4096-")
    assert result.steps == 3 and math.isfinite(result.val_bpb)
    opt_state, _ = load_train_state(result.last_checkpoint)
    assert len(opt_state["optimizers"]) == 2  # AdamW + Muon
    _, meta = resolve_model(str(tmp_path / "run"))
    tok = tokenizer_from_meta(meta)
    assert tok.vocab_size == 4096 and tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    # `tinyllm evaluate` on that run: the GPT-2-prepared held-out text in the model's own tokens, samples too
    from tinyllm.evaluate import measure_model
    from tinyllm.sampling import SamplingParams

    measured = measure_model(
        "custom", str(tmp_path / "run"), prompts=["To be"], seeds=(0,), params=SamplingParams(max_new_tokens=4),
        max_tokens=64,
    )  # fmt: skip
    assert measured.eval is not None and measured.eval.tokens_scored == 64 and measured.eval.bytes > 64
    assert len(measured.samples) == 1 and all(t < 4096 for t in measured.samples[0].token_ids)


def _ignore_term_and_sleep() -> None:  # a process that stops only when killed (a rank stuck in a collective)
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)


def test_after_a_second_ctrl_c_no_spawned_process_outlives_the_parent() -> None:
    """A rank stuck in a collective used to keep the job (and the parent, joining it at exit) alive for ever."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    stuck, quick = ctx.Process(target=_ignore_term_and_sleep), ctx.Process(target=sum, args=([1, 2],))
    stuck.start()
    quick.start()
    train_mod._end_processes([quick, stuck], grace_s=1.0)
    assert not stuck.is_alive() and stuck.exitcode == -9  # killed after the grace period
    assert quick.exitcode == 0  # it ended by itself


def test_a_rank_leaving_by_an_exception_skips_the_final_barrier(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its peer may be inside a step's collective, which the barrier would pair with: a hang (double Ctrl-C)."""
    import torch.distributed as dist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    monkeypatch.setenv("MASTER_PORT", str(train_mod._free_port()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    barriers: list[bool] = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(True))
    for finished in (False, True):
        job = train_mod._Dist("cpu")
        assert job.owns_group and dist.is_initialized()
        job.close(finished=finished)
        assert not dist.is_initialized() and barriers == ([True] if finished else [])


def test_a_run_dir_that_is_a_file_fails_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("a file")
    for run_dir, where in ((tmp_path / "notes.txt", "is a file"), (tmp_path / "notes.txt" / "run", "lies under")):
        with pytest.raises(TrainError, match=where):
            train(train_config(preset="seed", max_steps=1, run_dir=str(run_dir), data=("missing/*.txt",)))


def test_a_run_dir_that_cannot_be_written_fails_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """A read-only filesystem failed after the data was prepared, as a bare OS error (exit 1)."""
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(train_mod.os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and real_access(p, mode))
    for run_dir, where in (
        (tmp_path / "ro", r"ro cannot be written;"),
        (tmp_path / "ro" / "a" / "run", r"ro is where"),
    ):
        with pytest.raises(TrainError, match=where):
            train(train_config(preset="seed", max_steps=1, run_dir=str(run_dir), data=("missing/*.txt",)))


def test_running_out_of_memory_is_one_clear_error(tmp_path, corpus, monkeypatch) -> None:
    def no_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train_mod, "train_step", no_memory)
    with pytest.raises(TrainError, match=r"not enough memory on cpu for batches of 4 x 32 tokens \(at step 0\): lower"):
        train(tiny(tmp_path, corpus), progress=False)
    monkeypatch.setattr(train_mod, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors stay what they are
        train(tiny(tmp_path, corpus, run_dir=str(tmp_path / "other")), progress=False)


def test_stopping_processes_before_they_saved_anything_is_an_interruption(monkeypatch) -> None:
    """Ctrl-C while the processes were still starting read "error: process 1 terminated with signal SIGTERM"."""
    import signal as signal_mod

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    class Stopped:  # spawned processes that the signal ends before they report anything
        processes, error_files = [], []

        def join(self) -> bool:
            signal_mod.raise_signal(signal_mod.SIGTERM)
            raise ProcessException("process 1 terminated with signal SIGTERM", 1, 0)

    monkeypatch.setattr(mp, "start_processes", lambda *a, **k: Stopped())
    with pytest.raises(KeyboardInterrupt):
        train_mod._spawn(TrainConfig(), 2, progress=False)


def test_metrics_are_strict_json_and_no_progress_bar_is_drawn_into_a_log(tmp_path, corpus, capsys) -> None:
    """A run stopped before any evaluation counted as best wrote `Infinity`; a bar redrew ~10 times a second
    into logs and Docker builds (stderr not a terminal)."""
    train(tiny(tmp_path, corpus, max_steps=2, eval_interval=1000), progress=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    end = json.loads(lines[-1], parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    assert end["event"] == "end" and isinstance(end["best_val_loss"], float)
    record = train_mod._json_line({"event": "end", "best_val_loss": math.inf, "x": [math.nan, 1.0]})
    assert record == '{"event": "end", "best_val_loss": null, "x": [null, 1.0]}\n'
    err = capsys.readouterr().err
    assert "\r" not in err and "training:" not in err


@pytest.mark.parametrize(("signame", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_the_cli_exits_with_the_stopping_signals_usual_status(tmp_path, corpus, monkeypatch, signame, status):
    """SIGTERM (`kill`, `docker stop`) exited 130, Ctrl-C's status."""
    import signal as signal_mod

    _signal_at(monkeypatch, 2, getattr(signal_mod, signame))
    argv = ["train", "--preset", "seed", "--data", str(corpus), "--max-steps", "4", "--batch-size", "2"]
    argv += ["--block-size", "32", "--run-dir", str(tmp_path / "run"), "--no-progress", "--processes", "1"]
    assert main(argv) == status
    assert load_checkpoint(tmp_path / "run" / "last").meta["step"] == 2


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_runs(tmp_path, corpus, monkeypatch):
    """Two runs in one run directory interleaved their metrics (steps twice, two end events) and checkpoints."""
    import fcntl

    run = tmp_path / "runs" / "busy"
    run.mkdir(parents=True)
    with open(run / ".lock", "w") as held:  # as a run in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(TrainError, match=r"runs/busy is in use by another training run \(pid 4242\); wait for"):
            train(tiny(tmp_path, corpus, run_dir=str(run)), progress=False)
        assert os.listdir(run) == [".lock"]  # nothing of the refused run written
    result = train(tiny(tmp_path, corpus, run_dir=str(run), max_steps=1, eval_interval=1), progress=False)
    assert result.steps == 1 and (run / "last").is_dir()  # the lock went with its holder (any process end)
    assert not (run / ".lock").exists()  # and a run removes its own at the end
    # a run that fails before writing anything leaves no directories behind, its lock included
    monkeypatch.setattr(train_mod, "prepare", lambda *a, **k: (_ for _ in ()).throw(TrainError("no data")))
    with pytest.raises(TrainError, match="no data"):
        train(tiny(tmp_path, corpus, run_dir=str(tmp_path / "new" / "deeper" / "run")), progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(TrainError, match=r"run directory /proc/run cannot be written \(No such file or directory\)"):
        train(tiny(tmp_path, corpus, run_dir="/proc/run"), progress=False)  # (_check_run_dir sees /proc writable)


def test_the_run_lock_where_flock_is_missing_and_for_a_stray_rank(tmp_path, corpus, monkeypatch, caplog):
    """A filesystem without flock (NFS without lockd, Lustre without -o flock) read as "in use" and refused every
    run; a RANK without WORLD_SIZE (not torchrun: one process that writes files) skipped the lock."""
    import errno
    import fcntl

    calls = []

    def no_flock(fd, op):  # noqa: ANN001, ANN202
        calls.append(op)
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setenv("RANK", "1")  # and no WORLD_SIZE
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = train(tiny(tmp_path, corpus, max_steps=1, eval_interval=1), progress=False)
    assert result.steps == 1 and calls  # it tried to lock, and ran unguarded
    assert "cannot lock" in caplog.text and "Function not implemented" in caplog.text
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_dead_process_is_named_by_the_launcher_not_by_a_survivor(tmp_path, corpus, monkeypatch):
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    class Context:
        error_files = [None, None]

        def join(self) -> bool:
            raise ProcessExitedException("process 1 terminated with signal SIGKILL", 1, 4242, -9, "SIGKILL")

    def start_processes(fn, args, nprocs, join, start_method):  # noqa: ANN001, ANN202
        args[-1].put(("peer", 0, "another training process of this job stopped (Connection closed by peer)"))
        return Context()

    monkeypatch.setattr(mp, "start_processes", start_processes)
    with pytest.raises(TrainError, match="^process 1 terminated with signal SIGKILL$"):
        train(tiny(tmp_path, corpus, processes=2), progress=False)


def test_the_resume_hint_of_a_failed_job_names_what_survived(tmp_path):
    from tinyllm.checkpoint import save_checkpoint

    config = train_config(run_dir=str(tmp_path / "run"))
    assert train_mod._resume_hint(config) == ""
    save_checkpoint(tmp_path / "run" / "previous" / "last", model=GPT(TINY), meta={"step": 6})
    assert train_mod._resume_hint(config) == f"; the run before is still in {tmp_path / 'run' / 'previous'}"
    save_checkpoint(tmp_path / "run" / "last", model=GPT(TINY), meta={"step": 2})
    assert train_mod._resume_hint(config) == (
        f"; {tmp_path / 'run' / 'last'} holds step 2: the same command with --resume continues "
        f"(the run before is still in {tmp_path / 'run' / 'previous'})"
    )
