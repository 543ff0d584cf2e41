"""Checkpoint directories: round trips (weights, meta, optimizer, RNG), atomic writes, strict loads."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllm import __version__
from tinyllm.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    load_train_state,
    resolve_model,
    restore_rng_state,
    save_checkpoint,
)
from tinyllm.config import ModelConfig
from tinyllm.model import GPT

TINY = ModelConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY)


@pytest.fixture
def ckpt(model: GPT, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model=model, meta={"step": 7})


def _trained_optimizer(model: GPT) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(2):
        model(torch.randint(0, TINY.vocab_size, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_round_trip_weights_and_meta(model: GPT, tmp_path: Path) -> None:
    meta = {"step": 100, "tokens_seen": 12800, "val_loss": 3.25, "val_bpb": 1.5, "data_sources": ["shakespeare"]}
    path = save_checkpoint(tmp_path / "ckpt", model=model, meta={**meta, "custom": {"a": [1, 2]}})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    assert json.loads((path / "config.json").read_text()) == {"format_version": 1, "model": TINY.to_dict()}
    loaded = load_checkpoint(path)
    assert loaded.config == TINY and loaded.path == path and not loaded.model.training
    assert {k: loaded.meta[k] for k in meta} == meta and loaded.meta["custom"] == {"a": [1, 2]}
    assert loaded.meta["tokenizer"] == "gpt2" and loaded.meta["tinyllm_version"] == __version__
    assert loaded.meta["created"].endswith("+00:00")
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    idx = torch.randint(0, TINY.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), model.eval()(idx), atol=0, rtol=0)


def test_wrapped_model_saves_without_prefixes(model: GPT, tmp_path: Path) -> None:
    from safetensors import safe_open

    compiled = torch.compile(model)  # wraps lazily: nothing compiles unless it is called
    path = save_checkpoint(tmp_path / "ckpt", model=compiled)
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)


def test_dtype_on_load(ckpt: Path) -> None:
    model = load_checkpoint(ckpt, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_optimizer_and_train_state_round_trip(model: GPT, tmp_path: Path) -> None:
    opt = _trained_optimizer(model)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    rng = capture_rng_state()
    train_state = {"step": 2, "rng": rng, "data": {"position": 1234, "epoch": (0, 1)}, "scheduler": {"lr": 1e-3}}
    path = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, train_state=train_state)
    opt_state, state = load_train_state(path)
    assert state is not None and state["step"] == 2 and state["data"] == {"position": 1234, "epoch": (0, 1)}

    fresh_model = load_checkpoint(path).model.train()
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=5.0)
    fresh.load_state_dict(opt_state)
    original = opt.state_dict()
    restored = fresh.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert restored["state"].keys() == original["state"].keys()
    for pid, values in original["state"].items():
        for name, value in values.items():
            assert torch.equal(restored["state"][pid][name], value), (pid, name)

    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_no_train_state_gives_none(ckpt: Path) -> None:
    assert load_train_state(ckpt) == (None, None)


def test_atomic_overwrite_leaves_no_temp_dirs(model: GPT, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last", model=model, optimizer=_trained_optimizer(model), meta={"step": 1})
    save_checkpoint(path, model=model, meta={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    assert load_checkpoint(path).meta["step"] == 2
    assert not (path / "optimizer.safetensors").exists()  # the new checkpoint replaced the old one whole


def test_a_save_removes_what_a_killed_save_left_behind(model: GPT, tmp_path: Path) -> None:
    """A save killed with SIGKILL leaves `.last.tmp-*` (or `.last.old-*`, with the previous checkpoint)
    beside the run; they used to stay forever. The next good save removes those an hour old; a writer
    still at work (recent) and other names stay."""
    import os
    import time

    stale = [tmp_path / ".last.tmp-abc123", tmp_path / ".last.old-1234abcd"]
    for d in stale:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half written")
        os.utime(d, (time.time() - 7200, time.time() - 7200))
    recent, other = tmp_path / ".last.tmp-busy", tmp_path / ".best.tmp-old"
    for d in (recent, other):
        d.mkdir()
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    save_checkpoint(tmp_path / "last", model=model, meta={"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.tmp-old", ".last.tmp-busy", "last"]
    assert load_checkpoint(tmp_path / "last").meta["step"] == 1


def test_checkpoint_files_are_readable_as_the_umask_allows(model: GPT, tmp_path: Path) -> None:
    """safetensors creates its files owner-only: other users (a server's account, a shared machine) could not
    read the weights of a checkpoint or an export."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", model=model, optimizer={"state": {}}, train_state={"step": 1})
    finally:
        os.umask(previous)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in Path(path).iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_failed_save_keeps_old_checkpoint(model: GPT, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last", model=model, meta={"step": 1})
    with pytest.raises(TypeError, match="cannot store object"):
        save_checkpoint(path, model=model, train_state={"bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["last"] and load_checkpoint(path).meta["step"] == 1


def test_crash_while_writing_keeps_old_checkpoint(model: GPT, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tinyllm import checkpoint

    path = save_checkpoint(tmp_path / "last", model=model, meta={"step": 1})
    real_save_file = checkpoint.save_file

    def save_then_fail(*args: object, **kwargs: object) -> None:
        real_save_file(*args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", save_then_fail)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last: No space left on device \(the chec"):
        save_checkpoint(path, model=model, meta={"step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["last"] and load_checkpoint(path).meta["step"] == 1


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_replacing_a_checkpoint_swaps_it_in_one_step(model: GPT, tmp_path: Path, monkeypatch) -> None:
    """Two renames left a moment with no `last/` at all (a kill then, and --resume found nothing)."""
    from tinyllm import checkpoint

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    assert checkpoint._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())

    path = save_checkpoint(tmp_path / "last", model=model, meta={"step": 1})
    renames = []
    monkeypatch.setattr(checkpoint.os, "rename", lambda *a: renames.append(a))  # the two-rename path is not taken
    save_checkpoint(path, model=model, meta={"step": 2})
    assert renames == [] and load_checkpoint(path).meta["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "last"]  # the old copy is gone
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # elsewhere: two renames, the same result
    save_checkpoint(path, model=model, meta={"step": 3})
    assert load_checkpoint(path).meta["step"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "last"]


def test_replaces_a_broken_checkpoint(model: GPT, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last", model=model, meta={"step": 1})
    (path / "model.safetensors").unlink()
    save_checkpoint(path, model=model, meta={"step": 2})
    assert load_checkpoint(path).meta["step"] == 2


def test_refuses_to_replace_unrelated_directory(model: GPT, tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        save_checkpoint(tmp_path / "precious", model=model)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# --- every way a checkpoint can be broken gets its own message -----------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="is not a tinyllm checkpoint"):
        load_checkpoint(tmp_path / "other")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="not a tinyllm checkpoint.*Hugging Face gpt2"):
        load_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("name", ["config.json", "meta.json", "model.safetensors"])
def test_missing_file(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: {name} is missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["config.json", "meta.json"])
def test_bad_json(ckpt: Path, name: str) -> None:
    (ckpt / name).write_text('{"format_version": 1,')
    with pytest.raises(CheckpointError, match=f"{name} is not valid JSON"):
        load_checkpoint(ckpt)


def test_a_broken_model_directory_is_diagnosed_alike_for_loading_and_for_its_tokenizer(ckpt: Path) -> None:
    """`finetune --from` asks for the tokenizer first: a broken directory must say what is wrong there too, not
    "no model at" (as `generate` and `evaluate` say it, through resolve_model)."""
    from tinyllm.checkpoint import model_tokenizer, resolve_model

    (ckpt / "config.json").write_text('{"n_layer": 2,')
    for look in (resolve_model, model_tokenizer):
        with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
            look(str(ckpt))
    (ckpt / "config.json").unlink()
    (ckpt / "meta.json").unlink()  # only weights left: still a model directory missing its config
    for look in (resolve_model, model_tokenizer):
        with pytest.raises(CheckpointError, match="incomplete: config.json is missing"):
            look(str(ckpt))


def test_a_run_set_aside_by_a_rerun_is_what_loads_and_is_restored(model: GPT, tmp_path: Path, caplog) -> None:
    """A rerun that stopped before saving at an evaluation left the trained model in previous/: `generate` said
    "no model at", or loaded the rerun's untrained last/. The run set aside loads (with a warning) until the
    rerun replaces it; `tinyllm run` moves it back where the rerun left nothing."""
    from tinyllm.checkpoint import find_checkpoint, resolve_model, restore_set_aside

    run = tmp_path / "run"
    save_checkpoint(run / "previous" / "best", model=model, meta={"step": 7})
    save_checkpoint(run / "previous" / "last", model=model, meta={"step": 9})
    (run / "previous" / "metrics.jsonl").write_text('{"step": 9}\n')
    (run / "metrics.jsonl").write_text('{"step": 0}\n')  # the rerun's, which saved nothing
    _, meta = resolve_model(str(run))
    assert meta["step"] == 7 and "set aside" in caplog.text
    save_checkpoint(run / "last", model=model, meta={"step": 1})  # a rerun's interrupt save: still not preferred
    assert find_checkpoint(run) == run / "previous" / "best" and not restore_set_aside(run)
    shutil.rmtree(run / "last")
    assert restore_set_aside(run)
    assert find_checkpoint(run) == run / "best" and (run / "metrics.jsonl").read_text() == '{"step": 9}\n'
    assert not (run / "previous").exists() and not restore_set_aside(run)


def test_truncated_safetensors(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is corrupt or truncated"):
        load_checkpoint(ckpt)


def test_newer_format_version(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(CheckpointError, match="newer tinyllm.*format_version 2.*upgrade"):
        load_checkpoint(ckpt)


def test_invalid_model_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text(json.dumps({"format_version": 1, "model": {"n_layers": 2}}))
    with pytest.raises(CheckpointError, match="invalid model config.*n_layers"):
        load_checkpoint(ckpt)


def test_shape_mismatch(ckpt: Path) -> None:
    wider = {**TINY.to_dict(), "n_embd": 32}
    (ckpt / "config.json").write_text(json.dumps({"format_version": 1, "model": wider}))
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight has shape \(61, 16\).*needs \(61, 32\)"):
        load_checkpoint(ckpt)


def test_missing_and_unexpected_keys(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.0.extra"] = state.pop("transformer.ln_f.weight")
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"do not fit the model config \(missing: transformer\.ln_f\.weight; "):
        load_checkpoint(ckpt)


def test_a_config_larger_than_its_weights_fails_before_a_model_is_built(ckpt: Path) -> None:
    """20,000 layers in a config took a minute and a GB to build (even on the meta device) before the keys failed."""
    deeper = {**TINY.to_dict(), "n_layer": 20_000, "n_embd": 4096, "n_head": 32}
    (ckpt / "config.json").write_text(json.dumps({"format_version": 1, "model": deeper}))
    with pytest.raises(CheckpointError, match=r"the config says n_layer=20000 but the weights hold 1 blocks"):
        load_checkpoint(ckpt)
    longer = {**TINY.to_dict(), "block_size": 1 << 24}
    (ckpt / "config.json").write_text(json.dumps({"format_version": 1, "model": longer}))
    with pytest.raises(
        CheckpointError, match=r"transformer\.wpe\.weight has shape \(\d+, 16\) but the config needs \(16777216, 16\)"
    ):
        load_checkpoint(ckpt)


# --- finding and resolving models ----------------------------------------------------------------


def test_find_checkpoint_prefers_best_then_last(model: GPT, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert find_checkpoint(run) is None
    save_checkpoint(run / "last", model=model)
    assert find_checkpoint(run) == run / "last"
    save_checkpoint(run / "best", model=model)
    assert find_checkpoint(run) == run / "best"
    (run / "best" / "model.safetensors").unlink()
    assert find_checkpoint(run) == run / "last"
    assert find_checkpoint(run / "last") == run / "last"


def test_resolve_model(model: GPT, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path / "run" / "best", model=model, meta={"step": 3})
    for spec in (tmp_path / "run", tmp_path / "run" / "best"):
        resolved, meta = resolve_model(str(spec))
        assert isinstance(resolved, GPT) and not resolved.training
        assert meta["kind"] == "checkpoint" and meta["step"] == 3 and meta["source"] == str(tmp_path / "run" / "best")
    with pytest.raises(CheckpointError, match="no model at"):
        resolve_model(str(tmp_path / "nothing-here"))
    # "org/name" that is not here is a hub id, unless "org" is a folder here or the runs folder: a typo or an
    # untrained runs/default was sent to the hub (25 s of retries, then an error about downloading GPT-2)
    with monkeypatch.context() as m:
        m.chdir(tmp_path)
        m.setattr("tinyllm.gpt2.load_gpt2", lambda *a, **k: pytest.fail("went to the hub"))
        for spec in ("run/typo", "runs/default"):
            with pytest.raises(CheckpointError, match=f"no model at '{spec}': expected 'gpt2'"):
                resolve_model(spec)

    from tinyllm import gpt2
    from tinyllm.gpt2 import GPT2UnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(GPT2UnavailableError, match="openai-community/gpt2"):
        resolve_model("gpt2")
    calls = []
    monkeypatch.setattr(gpt2, "load_gpt2", lambda source, *, device: calls.append(source) or model)
    _, meta = resolve_model("someone/their-gpt2")
    assert meta == {"kind": "gpt2", "source": "someone/their-gpt2", "tokenizer": "gpt2"}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    resolve_model(str(tmp_path / "hf"))
    assert calls == ["someone/their-gpt2", str(tmp_path / "hf")]


def test_running_out_of_memory_while_loading_is_a_checkpoint_error(ckpt: Path, monkeypatch) -> None:
    from tinyllm import checkpoint

    def no_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(checkpoint, "_cast", no_memory)
    with pytest.raises(CheckpointError, match=r"not enough memory on cpu for its 0\.0 GB of weights"):
        load_checkpoint(ckpt)
