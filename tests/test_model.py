"""The GPT module: the seed's shape table, presets, parameter count, weight tying, KV-cache parity."""

from __future__ import annotations

import pytest
import torch

from tinyllm.config import PRESETS, ModelConfig
from tinyllm.kv_cache import KVCache
from tinyllm.model import GPT

TINY = ModelConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


def test_seed_preset_shape_table() -> None:
    """The seed README's table: embedding (1,N)->(1,N,128), each block keeps (1,N,128), head -> (1,N,50257)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name("seed")).eval()
    n = 5
    idx = torch.randint(0, 50257, (1, n))
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.transformer.wte.register_forward_hook(lambda m, i, o: shapes.__setitem__("embedding", tuple(o.shape))),
        model.lm_head.register_forward_hook(lambda m, i, o: shapes.__setitem__("head", tuple(o.shape))),
    ]
    for k, block in enumerate(model.transformer.h):
        hooks.append(
            block.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(f"block{k}", (i[0].shape, o.shape)))
        )
    with torch.no_grad():
        logits = model(idx)
    for h in hooks:
        h.remove()
    assert tuple(idx.shape) == (1, n)
    assert shapes["embedding"] == (1, n, 128)
    assert len(model.transformer.h) == 2
    for k in range(2):
        assert shapes[f"block{k}"] == (torch.Size([1, n, 128]), torch.Size([1, n, 128]))
    assert shapes["head"] == (1, n, 50257)
    assert tuple(logits.shape) == (1, n, 50257)


def test_presets() -> None:
    assert ModelConfig.from_name("seed") == PRESETS["seed"]
    gpt2 = ModelConfig.from_name("gpt2")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size, gpt2.vocab_size) == (12, 12, 768, 1024, 50257)
    assert ModelConfig.from_name("seed", n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.from_name("nope")


def test_gpt2_small_has_124m_parameters() -> None:
    with torch.device("meta"):
        model = GPT(ModelConfig.from_name("gpt2"))
    assert model.num_params() == 124_439_808


def test_param_count_is_sum_of_unique_params(tiny_model: GPT) -> None:
    unique = {id(p): p.numel() for p in tiny_model.parameters()}
    by_name = sum(t.numel() for t in tiny_model.state_dict().values())
    head = TINY.vocab_size * TINY.n_embd
    assert tiny_model.num_params() == sum(unique.values()) == by_name - head
    assert tiny_model.num_params(non_embedding=True) == tiny_model.num_params() - TINY.block_size * TINY.n_embd


def test_weight_tying(tiny_model: GPT) -> None:
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight
    with torch.no_grad():
        tiny_model.transformer.wte.weight[3].fill_(0.5)
    assert torch.all(tiny_model.lm_head.weight[3] == 0.5)


def test_kv_cache_prefill_and_decode_equal_no_cache(tiny_model: GPT) -> None:
    torch.manual_seed(1)
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    with torch.no_grad():
        full = tiny_model(idx)  # (2, 10, V)
        cache = KVCache.for_model(TINY, batch_size=2)
        prefill = tiny_model(idx[:, :6], input_pos=torch.arange(6), kv_cache=cache)
        steps = [tiny_model(idx[:, t : t + 1], input_pos=torch.tensor([t]), kv_cache=cache) for t in range(6, 10)]
    cached = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_kv_cache_per_row_positions_equal_no_cache(tiny_model: GPT) -> None:
    """Two rows at different positions in one batch: each equals its own uncached forward."""
    torch.manual_seed(2)
    a = torch.randint(0, TINY.vocab_size, (1, 7))
    b = torch.randint(0, TINY.vocab_size, (1, 4))
    with torch.no_grad():
        cache = KVCache.for_model(TINY, batch_size=2)
        tiny_model(a[:, :6], input_pos=torch.arange(6), kv_cache=cache.view(slice(0, 1)))
        tiny_model(b[:, :3], input_pos=torch.arange(3), kv_cache=cache.view(slice(1, 2)))
        step = torch.cat([a[:, 6:7], b[:, 3:4]])  # (2, 1): row 0 at position 6, row 1 at position 3
        out = tiny_model(step, input_pos=torch.tensor([[6], [3]]), kv_cache=cache)  # (2, 1, V)
        torch.testing.assert_close(out[0, 0], tiny_model(a)[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 0], tiny_model(b)[0, -1], atol=1e-5, rtol=1e-5)


def test_prompt_longer_than_block_size_raises(tiny_model: GPT) -> None:
    idx = torch.zeros(1, TINY.block_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds block_size"):
        tiny_model(idx)
    cache = KVCache.for_model(TINY, batch_size=1)
    with pytest.raises(ValueError, match="past the context limit"):
        tiny_model(idx, input_pos=torch.arange(TINY.block_size + 1), kv_cache=cache)
