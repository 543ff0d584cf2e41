"""The GPT-2 loader, proven by logit parity with a tiny random `transformers.GPT2LMHeadModel` (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tinyllm.checkpoint import CheckpointError
from tinyllm.gpt2 import GPT2UnavailableError, hf_config_dict, load_gpt2, to_hf_state_dict
from tinyllm.model import GPT

transformers = pytest.importorskip("transformers")

VOCAB = 101


@pytest.fixture(scope="module")
def hf_model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so a mapping mistake cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _hf_logits(model: transformers.GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def _ours(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


def _hub_style_dir(hf_model: transformers.GPT2LMHeadModel, path: Path) -> Path:
    """What the hub's openai-community/gpt2 holds: keys without `transformer.`, mask buffers, no lm_head."""
    path.mkdir()
    n_pos = hf_model.config.n_positions
    hf_state = hf_model.state_dict()
    state = {k.removeprefix("transformer."): v.clone() for k, v in hf_state.items() if k != "lm_head.weight"}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    return path


def test_save_pretrained_layout_matches_transformers(hf_model, tokens, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_gpt2(str(tmp_path / "hf"))
    assert not model.training
    assert model.config.n_layer == 2 and model.config.block_size == 64 and model.config.vocab_size == VOCAB
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(_ours(model, tokens), _hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_hub_layout_without_prefix_and_with_buffers(hf_model, tokens, tmp_path: Path) -> None:
    model = load_gpt2(str(_hub_style_dir(hf_model, tmp_path / "hub")))
    torch.testing.assert_close(_ours(model, tokens), _hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_pytorch_model_bin_with_lm_head(hf_model, tokens, tmp_path: Path) -> None:
    path = tmp_path / "bin"
    path.mkdir()
    torch.save(hf_model.state_dict(), path / "pytorch_model.bin")  # includes lm_head.weight (tied)
    (path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    model = load_gpt2(str(path))
    torch.testing.assert_close(_ours(model, tokens), _hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_dtype_and_device(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_gpt2(str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_strict_about_keys_and_tying(hf_model, tmp_path: Path) -> None:
    path = _hub_style_dir(hf_model, tmp_path / "hub")
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    state["transformer.h.0.attn.extra.weight"] = torch.zeros(2)
    del state["transformer.ln_f.bias"]
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: transformer\.ln_f\.bias.*unexpected: transformer\.h\.0"):
        load_gpt2(str(path))
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] += 1.0
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_gpt2(str(path))


def test_rejects_unsupported_config(hf_model, tmp_path: Path) -> None:
    path = _hub_style_dir(hf_model, tmp_path / "hub")
    (path / "config.json").write_text(json.dumps({**hf_model.config.to_dict(), "layer_norm_epsilon": 1e-6}))
    with pytest.raises(CheckpointError, match="layer_norm_epsilon=1e-06"):
        load_gpt2(str(path))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_embd": "32"}, "n_embd must be an integer, got '32'"),
        ({"n_layer": 2.5}, "n_layer must be an integer, got 2.5"),
        ({"n_head": None}, "n_head must be an integer, got None"),
        ({"layer_norm_epsilon": "tiny"}, "could not convert string to float"),
        ({"n_inner": 128, "n_embd": [32]}, "TypeError"),
    ],
)
def test_malformed_config_values_are_checkpoint_errors(hf_model, tmp_path: Path, change, message) -> None:
    path = _hub_style_dir(hf_model, tmp_path / "hub")
    (path / "config.json").write_text(json.dumps({**hf_model.config.to_dict(), **change}))
    with pytest.raises(CheckpointError, match="not a usable GPT-2 config") as info:
        load_gpt2(str(path))
    assert message in str(info.value)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON object, not list"):
        load_gpt2(str(path))


def _sharded_dir(hf_model: transformers.GPT2LMHeadModel, path: Path, second_shard: str) -> Path:
    path.mkdir()
    state = {k: v.clone() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    half = {k: state[k] for k in names[: len(names) // 2]}
    rest = {k: state[k] for k in names[len(names) // 2 :]}
    save_file(half, path / "model-00001-of-00002.safetensors")
    save_file(rest, path / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in half} | {k: second_shard for k in rest}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    return path


def test_sharded_weights_load_and_shard_names_stay_in_their_directory(hf_model, tokens, tmp_path: Path) -> None:
    path = _sharded_dir(hf_model, tmp_path / "sharded", "model-00002-of-00002.safetensors")
    torch.testing.assert_close(_ours(load_gpt2(str(path)), tokens), _hf_logits(hf_model, tokens))
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, outside)
    original = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors", "..", 7):
        weight_map = {k: (name if v.startswith("model-00002") else v) for k, v in original.items()}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match="is not a file name in that directory"):
            load_gpt2(str(path))


def test_offline_hub_id_raises_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # an empty cache
    with pytest.raises(GPT2UnavailableError) as info:
        load_gpt2()
    message = str(info.value)
    assert "openai-community/gpt2" in message and "offline" in message
    assert "huggingface-cli download openai-community/gpt2" in message and "local directory" in message


def test_openai_gpt2_in_the_cache_loads_without_a_request(hf_model, tokens, tmp_path: Path, monkeypatch) -> None:
    """OpenAI's GPT-2 repositories offline first: weights the hub cache holds load with no request (a machine
    without a network waited out the hub's retries); other repositories, which may change, still ask the hub."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo_id in ("openai-community/gpt2", "someone/tiny-gpt2"):
        repo = tmp_path / "hub-cache" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        hf_model.save_pretrained(repo / "snapshots" / commit)
    requests = []

    def download(repo_id, filename, **kwargs):  # noqa: ANN001, ANN003, ANN202 (the hub: a cached copy is current)
        requests.append((repo_id, filename))
        return str(tmp_path / "hub-cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    model = load_gpt2("openai-community/gpt2")
    torch.testing.assert_close(_ours(model, tokens), _hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)
    assert requests == []
    load_gpt2("someone/tiny-gpt2")
    assert ("someone/tiny-gpt2", "config.json") in requests and ("someone/tiny-gpt2", "model.safetensors") in requests


def test_missing_local_directory_raises_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GPT2UnavailableError, match="no such directory"):
        load_gpt2(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GPT2UnavailableError, match="no config.json"):
        load_gpt2(str(tmp_path / "empty"))


def test_to_hf_state_dict_loads_into_transformers(tokens) -> None:
    """The inverse mapping: our random model, written in HF names, gives the same logits in transformers."""
    from tinyllm.config import ModelConfig

    torch.manual_seed(3)
    ours = GPT(ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    state = to_hf_state_dict(ours)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    config = transformers.GPT2Config(**hf_config_dict(ours.config))
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict(state, strict=True)
    torch.testing.assert_close(_ours(ours, tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)


def test_bias_free_model_exports_with_zero_biases(tokens) -> None:
    from tinyllm.config import ModelConfig

    torch.manual_seed(4)
    ours = GPT(ModelConfig(vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2, n_embd=32, bias=False)).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(ours.config))).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=True)
    torch.testing.assert_close(_ours(ours, tokens), _hf_logits(hf, tokens), atol=1e-5, rtol=1e-5)
