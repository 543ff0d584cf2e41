"""The batch-1 decode step written in C: the same tokens as eager decoding and the no-cache oracle (the seed preset's
shape, a bias-free model with odd sizes, a tiny GPT-2 from `transformers`), a lone sequence in any slot equal to it
alone, the same numbers for any thread count, bad inputs refused, and a clear fallback where it cannot run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from engine_helpers import run_to_end

from tinyllm import fused_decode
from tinyllm.config import ModelConfig
from tinyllm.engine import Engine, GenerationResult, Request, RequestHandle, generate, generate_naive
from tinyllm.kv_cache import KVCache
from tinyllm.model import GPT
from tinyllm.quantize import prepare_for_inference
from tinyllm.sampling import SamplingParams

CFG = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
# no biases; 36 channels and head size 12 are not multiples of the dot product's 16-float step (its tails run)
ODD = ModelConfig(vocab_size=101, block_size=40, n_layer=3, n_head=3, n_embd=36, bias=False)
# head size 64, as every GPT-2 size and the default preset have: attention's own path for it
HEAD64 = ModelConfig(vocab_size=89, block_size=48, n_layer=2, n_head=2, n_embd=128)
GREEDY = dict(temperature=0.0, max_new_tokens=24, ignore_eos=True)

pytestmark = pytest.mark.skipif(fused_decode.unavailable(torch.device("cpu")) is not None, reason="no C compiler here")


def _model(seed: int, config: ModelConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so a mistake in either cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return prepare_for_inference(model)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def model() -> GPT:
    return _model(0)


@pytest.fixture
def c_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every C step run, one per token (so a test sees the engine took that path)."""
    steps: list[int] = []
    decode, decode_many = fused_decode.FusedDecoder.decode, fused_decode.FusedDecoder.decode_many

    def counted(self, token, cache, length, **kwargs):  # noqa: ANN001, ANN003, ANN202
        steps.append(length)
        return decode(self, token, cache, length, **kwargs)

    def counted_many(self, token, cache, length, count, **kwargs):  # noqa: ANN001, ANN003, ANN202
        tokens = decode_many(self, token, cache, length, count, **kwargs)
        steps.extend(range(length, length + len(tokens)))
        return tokens

    monkeypatch.setattr(fused_decode.FusedDecoder, "decode", counted)
    monkeypatch.setattr(fused_decode.FusedDecoder, "decode_many", counted_many)
    return steps


@pytest.fixture
def bursts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(tokens asked for, tokens returned) of every `decode_many` call."""
    calls: list[tuple[int, int]] = []
    decode_many = fused_decode.FusedDecoder.decode_many

    def recorded(self, token, cache, length, count, **kwargs):  # noqa: ANN001, ANN003, ANN202
        tokens = decode_many(self, token, cache, length, count, **kwargs)
        calls.append((count, len(tokens)))
        return tokens

    monkeypatch.setattr(fused_decode.FusedDecoder, "decode_many", recorded)
    return calls


def _prefilled(model: GPT, prompt: list[int], copies: int = 2) -> list[KVCache]:
    caches = [KVCache.for_model(model.config, batch_size=1) for _ in range(copies)]
    with torch.inference_mode():
        for cache in caches:
            idx = torch.tensor([prompt])
            model.hidden_states(idx, input_pos=torch.arange(len(prompt)), kv_cache=cache)
    return caches


def _decoder(model: GPT) -> fused_decode.FusedDecoder:
    decoder = fused_decode.FusedDecoder(model)
    decoder.warm_up(KVCache.for_model(model.config, batch_size=1))
    return decoder


@pytest.mark.parametrize("config", [CFG, ODD, HEAD64], ids=["seed-shape", "odd-no-bias", "head-64"])
def test_c_greedy_equals_eager_and_the_oracle(config: ModelConfig, c_steps: list[int]) -> None:
    model = _model(0, config)
    prompt = [5, 17, 3, 42, 8]
    engine = Engine(model, max_batch_size=1, compile=True)
    assert engine.decode_step == "c"
    (fast,) = run_to_end(engine, [prompt], GREEDY)
    # the prefill draws the first token; each of the other 23 came from a C step, at lengths 6..28
    assert c_steps == list(range(len(prompt) + 1, len(prompt) + 24))
    (eager,) = run_to_end(Engine(model, max_batch_size=1), [prompt], GREEDY)
    (oracle,) = generate_naive(model, [prompt], SamplingParams(**GREEDY), eos_token_id=None)
    assert fast == eager == oracle
    assert len(fast) == 24


@pytest.mark.parametrize("config", [CFG, ODD, HEAD64], ids=["seed-shape", "odd-no-bias", "head-64"])
def test_c_logits_and_cache_writes_match_eager(config: ModelConfig) -> None:
    """Steps at growing lengths on caches prefilled alike: the same numbers up to summation order, the argmax
    computed in C equal to torch's over the returned logits, the same keys and values written in place."""
    model = _model(1, config)
    caches = _prefilled(model, [1, 2, 3, 4, 5, 6])
    decoder = _decoder(model)
    token = 7
    with torch.inference_mode():
        for length in range(7, 20):
            logits, greedy = decoder.decode(token, caches[0], length)  # (1, V), (1,)
            pos = torch.tensor([length - 1])
            eager = model(torch.tensor([[token]]), input_pos=pos, kv_cache=caches[1])[:, -1]  # (1, V)
            assert logits.shape == (1, config.vocab_size)
            assert greedy == logits.argmax(dim=-1).tolist()  # the argmax computed in C
            torch.testing.assert_close(logits, eager, atol=1e-5, rtol=1e-5)
            token = greedy[0]
    for ours, theirs in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert caches[0].k[0][0, :, 18].abs().sum() > 0 and caches[0].k[0][0, :, 19:].abs().sum() == 0  # up to 18 only


def test_column_blocks_hold_each_block_of_columns_contiguous() -> None:
    """The MLP's second weight as the C step reads it: block b is columns b C .. (b + 1) C, rows kept."""
    w = torch.randn(6, 24)
    (blocks,) = fused_decode.column_blocks([w], 6)
    assert blocks.shape == (4, 6, 6) and blocks.is_contiguous() and blocks.dtype == torch.float32
    for b in range(4):
        assert torch.equal(blocks[b], w[:, 6 * b : 6 * (b + 1)])
    assert blocks.data_ptr() != w.data_ptr()  # a copy: the model's own weight is untouched
    with pytest.raises(ValueError, match="multiple of it"):
        fused_decode.column_blocks([torch.randn(6, 20)], 6)


@pytest.mark.parametrize("head_size", [12, 64])
def test_decode_attention_equals_sdpa_over_each_rows_own_positions(head_size: int) -> None:
    """Batched eager decoding's attention in C: each row over its positions up to its own, as SDPA with the
    model's mask; a row's numbers the same whatever its batch-mates and the thread count."""
    torch.manual_seed(0)
    B, H, S, D = 5, 3, 40, head_size
    qkv = torch.randn(B, 1, 3 * H * D)  # q is a strided view of the projection's output, as in the model
    q = qkv[..., : H * D].view(B, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
    k_cache, v_cache = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    pos = torch.tensor([[3], [39], [0], [17], [20]])  # (B, 1)
    length = int(pos.max()) + 1
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    attention = fused_decode.DecodeAttention()
    got = attention(q, k, v, pos)
    mask = torch.arange(length).view(1, 1, 1, -1) <= pos.view(B, 1, 1, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, D)
    assert got.shape == (B, 1, H * D)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(B, 1, H * D), rtol=1e-5, atol=1e-6)
    for b in range(B):  # alone, in a one-row cache
        assert torch.equal(attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], pos[b]), got[b : b + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attention(q, k, v, pos), got)
    finally:
        torch.set_num_threads(threads)
    shared = attention(q, k, v, torch.tensor([9]))  # one position for every row
    assert torch.equal(shared[3], attention(q[3:4], k[3:4], v[3:4], torch.tensor([9]))[0])
    assert torch.equal(attention(q, k, v, torch.tensor([9]).expand(B, 1)), shared)  # any layout or int dtype
    assert torch.equal(attention(q, k, v, pos.to(torch.int32)), got)
    with pytest.raises(ValueError, match="outside the 40 cached"):
        attention(q, k, v, torch.tensor([[3], [40], [0], [1], [2]]))
    with pytest.raises(ValueError, match="one query per row"):
        attention(torch.randn(B, H, 2, D), k, v, pos)
    with pytest.raises(ValueError, match="float32"):
        attention(q.double(), k, v, pos)


def test_engines_decode_with_the_c_attention_and_match_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine's eager steps (rows of different lengths) use the C attention: the same greedy ids as the
    oracle, which recomputes everything with torch's attention."""
    rows: list[int] = []
    call = fused_decode.DecodeAttention.__call__

    def counted(self: fused_decode.DecodeAttention, q: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        rows.append(len(q))
        return call(self, q, *args)

    monkeypatch.setattr(fused_decode.DecodeAttention, "__call__", counted)
    model = _model(3, ODD)
    engine = Engine(model, max_batch_size=3, max_seq_len=ODD.block_size)
    assert isinstance(engine.cache.decode_attention, fused_decode.DecodeAttention)
    prompts = [[1, 2, 3], [5] * 11, [7, 8]]
    got = run_to_end(engine, prompts, GREEDY)
    assert got == generate_naive(model, prompts, SamplingParams(**GREEDY), eos_token_id=None)
    assert len(rows) == (GREEDY["max_new_tokens"] - 1) * ODD.n_layer and set(rows) == {3}  # every step, every layer
    assert KVCache.decode_attention is None  # a cache of its own has none: torch's attention


# runs many 32-row chunks long (q/k/v: 1536 rows, the head 4096): a thread that finishes early takes half of
# what is left of another's run, not all of it
WIDE = ModelConfig(vocab_size=4096, block_size=16, n_layer=1, n_head=8, n_embd=512)


@pytest.mark.parametrize("config", [CFG, WIDE], ids=["seed-shape", "wide"])
def test_any_thread_count_gives_the_same_numbers(config: ModelConfig) -> None:
    """Each thread takes a run of rows, but every row's sum is computed the same way: bit-equal logits."""
    model = _model(0, config)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 5):  # 3 and 5 on this 2-core machine: threads preempted, the others steal
            torch.set_num_threads(threads)
            (cache,) = _prefilled(model, [9, 8, 7], copies=1)
            decoder = _decoder(model)
            with torch.inference_mode():
                results.append([decoder.decode(t, cache, n)[0] for n, t in ((4, 5), (5, 11), (6, 2))])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_a_lone_sequence_in_a_later_slot_equals_it_alone(model: GPT, c_steps: list[int]) -> None:
    """Two short requests fill slots 0 and 1 and finish; the long one in slot 2 goes on alone, in C."""
    engine = Engine(model, max_batch_size=4, compile="c")
    short = dict(temperature=0.0, max_new_tokens=2, ignore_eos=True)
    handles = [engine.submit(Request(prompt=[9, 9], params=SamplingParams(**short))) for _ in range(2)]
    long = engine.submit(Request(prompt=[4, 8, 15, 16, 23, 42], params=SamplingParams(**GREEDY)))
    while engine.has_work():
        engine.step()
    alone = generate(model, [[4, 8, 15, 16, 23, 42]], SamplingParams(**GREEDY), eos_token_id=None)[0]
    assert long.result().token_ids == alone.token_ids
    assert [h.result().completion_tokens for h in handles] == [2, 2]
    assert len(c_steps) >= 20  # once the short ones finished, the long one decoded alone, in C
    assert engine.cache.k[0][3].abs().sum() == 0  # the unused slot was never written


@pytest.mark.parametrize("burst_s", [0.0, 1e6], ids=["one-token-calls", "bursts"])
def test_generation_stops_at_the_context_limit(model: GPT, c_steps: list[int], burst_s: float) -> None:
    prompt = list(range(1, 51))
    params = dict(temperature=0.0, max_new_tokens=100, ignore_eos=True)
    engine = Engine(model, max_batch_size=1, compile="c")
    engine.burst_s = burst_s
    handle = engine.submit(Request(prompt=prompt, params=SamplingParams(**params)))
    while engine.has_work():
        engine.step()
    result = handle.result()
    assert result.finish_reason == "length" and result.completion_tokens == CFG.block_size - len(prompt)
    assert c_steps[-1] == CFG.block_size - 1  # the last step fed position 62 and drew the token that fills 63
    (oracle,) = generate_naive(model, [prompt], SamplingParams(**params), eos_token_id=None)
    assert result.token_ids == oracle[: result.completion_tokens]


def test_seeded_sampling_is_reproducible(model: GPT) -> None:
    params = dict(temperature=1.0, top_k=20, seed=1234, max_new_tokens=20, ignore_eos=True)
    first = run_to_end(Engine(model, max_batch_size=1, compile="c"), [[3, 1, 4]], params)
    second = run_to_end(Engine(model, max_batch_size=1, compile="c"), [[3, 1, 4]], params)
    assert first == second and len(first[0]) == 20


def test_a_tiny_gpt2_decodes_as_transformers_does(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tinyllm.gpt2 import load_gpt2

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=101)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    model = prepare_for_inference(load_gpt2(str(tmp_path / "hf")))
    prompt = [3, 1, 4, 1, 5]
    engine = Engine(model, max_batch_size=1, compile="c")
    assert engine.decode_step == "c"
    (ours,) = run_to_end(engine, [prompt], dict(temperature=0.0, max_new_tokens=20, ignore_eos=True))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20)
    assert ours == out[0, len(prompt) :].tolist()


def test_bad_inputs_are_refused(model: GPT) -> None:
    decoder = fused_decode.FusedDecoder(model)
    (cache,) = _prefilled(model, [1, 2], copies=1)
    with pytest.raises(RuntimeError, match="warm_up"):
        decoder.decode(3, cache, 3)
    decoder.warm_up(cache)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.decode(CFG.vocab_size, cache, 3)
    with pytest.raises(ValueError, match="outside the context"):
        decoder.decode(3, cache, CFG.block_size + 1)
    with pytest.raises(ValueError, match="out must be"):
        decoder.decode(3, cache, 3, out=torch.empty(1, CFG.vocab_size + 1))
    out = torch.full((1, CFG.vocab_size), float("nan"))
    logits, greedy = decoder.decode(3, cache, 3, out=out)
    assert logits is out and not out.isnan().any() and greedy == out.argmax(dim=-1).tolist()
    two_slots = KVCache.for_model(CFG, batch_size=2)
    with pytest.raises(ValueError, match="one-slot CPU cache"):
        decoder.decode(3, two_slots, 3)
    assert two_slots.k[0].abs().sum() == 0  # nothing was written


# --- bursts: a lone greedy sequence decodes several tokens per call of the C step --------------------------------


@pytest.fixture(scope="module")
def varied() -> GPT:
    """A model whose greedy text does not settle on one token at once (a freshly initialized one repeats its
    first token), so that a stop inside a burst can be placed."""
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 2 else 0.1)
    return prepare_for_inference(model)  # type: ignore[return-value]


def _bursting(model: GPT, **kwargs: object) -> Engine:
    """An engine whose bursts are sized by MAX_BURST and the tokens left, never by how long a step took here."""
    engine = Engine(model, compile="c", **{"max_batch_size": 1, **kwargs})  # type: ignore[arg-type]
    engine.burst_s = 1e6
    return engine


def _greedy(engine: Engine, prompt: list[int], **params: object) -> GenerationResult:
    handle = engine.submit(Request(prompt=prompt, params=SamplingParams(**{**GREEDY, **params})))
    while engine.has_work():
        engine.step()
    return handle.result()


def test_bursts_give_the_tokens_of_one_step_at_a_time(model: GPT, bursts: list[tuple[int, int]]) -> None:
    prompt = [5, 17, 3, 42, 8]
    single = Engine(model, max_batch_size=1, compile="c")
    single.burst_s = 0.0
    one = _greedy(single, prompt, max_new_tokens=40)
    assert bursts == []  # one token per call
    burst = _greedy(_bursting(model), prompt, max_new_tokens=40)
    # the first C step is timed alone; then a tiny model's steps fit MAX_BURST tokens in a burst, the last is cut
    # to the tokens left (39 from C: 1 + 16 + 16 + 6)
    assert bursts == [(16, 16), (16, 16), (6, 6)]
    assert burst.token_ids == one.token_ids and burst.finish_reason == one.finish_reason == "length"
    (oracle,) = generate_naive(model, [prompt], SamplingParams(**{**GREEDY, "max_new_tokens": 40}), eos_token_id=None)
    assert burst.token_ids == oracle


def test_a_stop_token_or_string_inside_a_burst_ends_it_there(varied: GPT, bursts: list[tuple[int, int]]) -> None:
    prompt = [5, 17, 3, 42, 8]
    ids = _greedy(_bursting(varied), prompt, max_new_tokens=40).token_ids
    at = next(i for i in range(4, len(ids)) if ids[i] not in ids[:i])  # a token first drawn inside a burst
    assert 2 <= at < 18  # tokens 2..17 come from the first burst
    bursts.clear()
    stopped = _greedy(_bursting(varied), prompt, stop_token_ids=(ids[at],))
    assert stopped.token_ids == ids[: at + 1] and (stopped.finish_reason, stopped.stop_reason) == ("stop", ids[at])
    assert bursts == [(16, at - 1)]  # the C loop itself stopped at the id
    eos = _greedy(_bursting(varied, eos_token_id=ids[at]), prompt, ignore_eos=False)
    assert eos.token_ids == ids[: at + 1] and (eos.finish_reason, eos.stop_reason) == ("stop", ids[at])

    def decode(tokens: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in tokens)

    stop = decode(ids[at - 1 : at + 1])  # two characters across a token boundary
    first = decode(ids).index(stop)  # where the text first shows them
    results = []
    for burst_s in (0.0, 1e6):
        engine = Engine(varied, max_batch_size=1, compile="c", decode=decode)
        engine.burst_s = burst_s
        bursts.clear()
        results.append(_greedy(engine, prompt, max_new_tokens=40, stop=(stop,)))
        assert bool(bursts) == (burst_s > 0)
    for result in results:
        assert (result.finish_reason, result.stop_reason) == ("stop", stop)
        assert result.token_ids == ids[: first + 2] and result.text == decode(ids[:first])


def test_interrupt_ends_a_burst_after_its_current_step(model: GPT) -> None:
    (cache,) = _prefilled(model, [1, 2, 3], copies=1)
    decoder = _decoder(model)
    stepwise, token = [], 4
    for length in range(4, 12):
        token = decoder.decode(token, cache, length)[1][0]
        stepwise.append(token)
    decoder.interrupt()
    assert decoder.decode_many(4, cache, 4, 8) == stepwise[:1]
    decoder.reset_interrupt()
    assert decoder.decode_many(4, cache, 4, 8) == stepwise
    with pytest.raises(ValueError, match="count must be"):
        decoder.decode_many(4, cache, 4, 0)
    assert len(decoder.decode_many(4, cache, CFG.block_size - 3, 4)) == 4  # positions 60..63, the last one
    with pytest.raises(ValueError, match="pass the context"):
        decoder.decode_many(4, cache, CFG.block_size - 3, 5)


@pytest.mark.parametrize("change", ["submit", "cancel"])
def test_a_new_request_or_a_cancel_ends_a_burst(
    model: GPT, monkeypatch: pytest.MonkeyPatch, bursts: list[tuple[int, int]], change: str
) -> None:
    """A request that arrives (or a cancel that comes) while a burst runs gets the engine back after one step."""
    engine = _bursting(model, max_batch_size=2)
    first = engine.submit(Request(prompt=[5, 17, 3], params=SamplingParams(**{**GREEDY, "max_new_tokens": 40})))
    for _ in range(2):  # prefill and a timed single step, then a first burst
        engine.step()
    arrived: list[RequestHandle] = []
    decode_many = fused_decode.FusedDecoder.decode_many  # the recording one

    def meanwhile(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not arrived:  # on another thread in a server; the C loop sees the flag after its step either way
            if change == "submit":
                arrived.append(engine.submit(Request(prompt=[9, 9], params=SamplingParams(**GREEDY))))
            else:
                arrived.append(first)
                engine.cancel(first)
        return decode_many(self, *args, **kwargs)

    monkeypatch.setattr(fused_decode.FusedDecoder, "decode_many", meanwhile)
    engine.step()
    assert bursts[0] == (16, 16) and bursts[-1] == (16, 1)  # the burst running at the change: one step
    while engine.has_work():
        engine.step()
    alone = generate(model, [[5, 17, 3]], SamplingParams(**{**GREEDY, "max_new_tokens": 40}), eos_token_id=None)[0]
    if change == "submit":
        assert first.result().token_ids == alone.token_ids
        assert (
            arrived[0].result().token_ids
            == generate(model, [[9, 9]], SamplingParams(**GREEDY), eos_token_id=None)[0].token_ids
        )
    else:
        result = first.result()
        assert result.finish_reason == "cancelled"
        assert result.token_ids == alone.token_ids[: 2 + 16]  # nothing from the interrupted burst


def test_bursts_last_about_burst_s(model: GPT, bursts: list[tuple[int, int]]) -> None:
    engine = Engine(model, max_batch_size=1, compile="c")
    engine.submit(Request(prompt=[5, 17, 3], params=SamplingParams(**{**GREEDY, "max_new_tokens": 40})))
    engine.step()  # prefill and the first C step, timed alone
    assert bursts == [] and engine._c_step_s is not None
    asked = []
    for step_s in (0.02, 0.2, 1e-4):  # burst_s (0.08 s) over the last call's time per token, at most 16
        engine._c_step_s = step_s
        calls = len(bursts)
        engine.step()
        asked.append(bursts[-1][0] if len(bursts) > calls else 1)
    assert asked == [4, 1, 16]


def test_a_cancel_before_the_burst_starts_runs_nothing(model: GPT, bursts: list[tuple[int, int]]) -> None:
    engine = _bursting(model)
    handle = engine.submit(Request(prompt=[5, 17, 3], params=SamplingParams(**GREEDY)))
    engine.step()
    seq = engine._slots[0]
    assert seq is not None
    engine.cancel(handle)  # after `step` listed the sequence to decode, before its burst
    assert engine._decode([seq]) == [] and bursts == []
    assert handle.result().finish_reason == "cancelled" and handle.result().completion_tokens == 2


def test_a_request_waiting_without_a_free_slot_does_not_stop_bursts(model: GPT, bursts: list[tuple[int, int]]) -> None:
    engine = _bursting(model)  # one slot
    prompts = [[5, 17, 3], [9, 9]]
    params = SamplingParams(**{**GREEDY, "max_new_tokens": 30})
    handles = [engine.submit(Request(prompt=p, params=params)) for p in prompts]
    while engine.has_work():
        engine.step()
    # 30 tokens each: the prefill's, one C step timed alone, then 16 + 12 while the second waits for the slot;
    # the second: the prefill's, then 16 + 13 (its steps are sized by the first one's timing)
    assert [b[0] for b in bursts] == [16, 12, 16, 13]
    for handle, prompt in zip(handles, prompts, strict=True):
        alone = generate(model, [prompt], params, eos_token_id=None)[0]
        assert handle.result().token_ids == alone.token_ids


def test_sampled_and_logprob_requests_take_one_token_a_call(model: GPT, bursts: list[tuple[int, int]]) -> None:
    engine = Engine(model, max_batch_size=1, compile="c")
    sampled = _greedy(engine, [3, 1, 4], temperature=1.0, seed=7)
    with_logprobs = _greedy(engine, [3, 1, 4], logprobs=True)
    penalized = _greedy(engine, [3, 1, 4], repetition_penalty=1.3)
    assert bursts == []  # each needs the logits of every step in Python
    assert len(with_logprobs.logprobs or []) == len(with_logprobs.token_ids) == 24
    assert len(sampled.token_ids) == len(penalized.token_ids) == 24
    assert with_logprobs.token_ids == _greedy(engine, [3, 1, 4]).token_ids
    assert bursts  # and the same greedy request without logprobs took bursts


def test_other_dtypes_and_devices_say_why() -> None:
    torch.manual_seed(0)
    bf16 = prepare_for_inference(GPT(CFG).eval(), dtype="bfloat16")
    assert "float32" in (fused_decode.unavailable(torch.device("cpu"), bf16) or "")
    int8 = prepare_for_inference(GPT(CFG).eval(), quantize="int8")
    assert "float32" in (fused_decode.unavailable(torch.device("cpu"), int8) or "")
    assert "is on cuda" in (fused_decode.unavailable(torch.device("cuda")) or "")
    engine = Engine(bf16, max_batch_size=1, compile=True)  # bf16: the C step does not apply, inductor's does
    assert engine.decode_step in ("inductor", "eager")


def test_no_compiler_falls_back_to_inductor(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from tinyllm import compiled_decode

    monkeypatch.setattr(fused_decode, "_compiler", lambda: None)
    assert "no C compiler" in (fused_decode.unavailable(torch.device("cpu")) or "")
    engine = Engine(_model(3), max_batch_size=1, compile="c")
    assert engine.decode_step == "eager"
    assert "decoding eagerly: no C compiler found" in caplog.text
    engine = Engine(_model(3), max_batch_size=1, compile=True)
    inductor_here = compiled_decode.unavailable(torch.device("cpu")) is None
    assert engine.decode_step == ("inductor" if inductor_here else "eager")


def test_a_failing_build_is_reported_and_the_engine_falls_back(
    model: GPT, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fused_decode, "_LIBRARY", None)  # build again, with a compiler that fails
    monkeypatch.setattr(fused_decode, "_FAILED", {})
    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "cc"))
    script = f"#!/bin/sh\necho run >> {tmp_path}/runs\necho 'decode_step.c:1: error: boom' >&2\nexit 1\n"
    (tmp_path / "cc").write_text(script)
    (tmp_path / "cc").chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="tinyllm.engine"):
        engine = Engine(model, max_batch_size=1, compile="c")
    assert engine.decode_step == "eager" and engine.cache.decode_attention is None  # torch's attention too
    assert "decoding eagerly: building the c decode step failed" in caplog.text and "error: boom" in caplog.text
    assert "decoding steps use torch's attention" in caplog.text
    Engine(model, max_batch_size=2, compile="c")  # the failure is remembered: no compiler run per engine
    assert (tmp_path / "runs").read_text().split() == ["run", "run"]  # once with -march=native, once without
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left behind
    (oracle,) = generate_naive(model, [[5, 5]], SamplingParams(**GREEDY), eos_token_id=None)
    assert run_to_end(engine, [[5, 5]], GREEDY) == [oracle]


def test_the_build_is_cached_per_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fused_decode, "_LIBRARY", None)
    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path))
    fused_decode._build()
    (built,) = (tmp_path / "kernels").iterdir()
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(fused_decode, "_LIBRARY", None)  # a new process: loads the built library, no compile
    monkeypatch.setattr(fused_decode.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    fused_decode._build()
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()] == [stamp]


def test_a_step_that_disagrees_with_eager_is_refused(
    model: GPT, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """warm_up checks one step against the eager model: a kernel reading the wrong weights never serves."""
    weights = fused_decode._weights

    def swapped(m: GPT, *, copy: bool = True) -> tuple[list, float]:
        tensors, eps = weights(m, copy=copy)
        tensors[5 + 8], tensors[5 + 12 + 8] = tensors[5 + 12 + 8], tensors[5 + 8]  # layer 0 and 1's MLP weights
        return tensors, eps

    monkeypatch.setattr(fused_decode, "_weights", swapped)
    with caplog.at_level(logging.WARNING, logger="tinyllm.engine"):
        engine = Engine(model, max_batch_size=1, compile="c")
    assert engine.decode_step == "eager"
    assert "disagrees with the eager model" in caplog.text


def test_ties_and_nan_pick_the_index_torch_argmax_picks() -> None:
    """The argmax is computed in C across the threads' runs: the first largest logit, a NaN over any number."""
    model = _model(5)
    prompt, token = [1, 2, 3], 7
    (cache,) = _prefilled(model, prompt, copies=1)
    with torch.inference_mode():
        h = model.hidden_states(torch.tensor([prompt + [token]]))[0, -1]  # (C,) the final hidden state
    decoder = _decoder(model)
    wte = model.transformer.wte.weight  # tied to the head: its rows are the logits' weights
    with torch.no_grad():
        wte[10] = wte[80] = 50 * h / h.norm()  # rows in both threads' halves, tied and the largest
    for nan_rows, expected in (((), 10), ((60,), 60), ((90, 60), 60)):
        with torch.no_grad():
            for r in nan_rows:
                wte[r] = float("nan")
            logits, greedy = decoder.decode(token, cache, len(prompt) + 1)
        assert greedy == [expected] == logits.argmax(dim=-1).tolist()


def test_another_default_dtype_changes_nothing(model: GPT) -> None:
    """The C step's buffers are float32 whatever torch's default dtype is (they are written as floats)."""
    (cache,) = _prefilled(model, [4, 5], copies=1)
    before = _decoder(model).decode(6, cache, 3)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        decoder = _decoder(model)
        logits, greedy = decoder.decode(6, cache, 3)
    finally:
        torch.set_default_dtype(default)
    assert logits.dtype == torch.float32 and torch.equal(logits, before[0]) and greedy == before[1]


def test_weights_replaced_under_a_live_decoder_do_not_crash_it() -> None:
    """The decoder keeps the weights' memory alive: replacing a parameter's data leaves it reading the old values."""
    model = _model(6)
    (cache,) = _prefilled(model, [3, 3], copies=1)
    decoder = _decoder(model)
    before = decoder.decode(4, cache, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()  # the old storage would be freed if nothing else held it
    import gc

    gc.collect()
    after = decoder.decode(4, cache, 3)
    assert torch.equal(after[0], before[0]) and after[1] == before[1]


@pytest.mark.parametrize("cc", ["no-such-compiler-here", "ccache-like {cc}"], ids=["missing", "with-arguments"])
def test_a_compiler_command_with_arguments_or_missing(cc: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$CC may carry arguments ("ccache gcc"); a $CC that does not exist fails cleanly, leaving no file behind."""
    real = fused_decode._compiler()
    assert real is not None
    wrapper = tmp_path / "ccache-like"
    wrapper.write_text('#!/bin/sh\nexec "$@"\n')  # runs its arguments, as ccache does
    wrapper.chmod(0o755)
    monkeypatch.setattr(fused_decode, "_LIBRARY", None)
    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CC", cc.replace("ccache-like", str(wrapper)).format(cc=real[0]))
    if cc.startswith("no-such"):
        with pytest.raises(RuntimeError, match="building the C decode step failed"):
            fused_decode._build()
        assert list((tmp_path / "home" / "kernels").iterdir()) == []
    else:
        assert fused_decode._build().tinyllm_decode_step is not None


def test_a_corrupt_cached_library_is_built_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fused_decode, "_LIBRARY", None)
    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path / "a"))
    fused_decode._build()
    (built,) = (tmp_path / "a" / "kernels").iterdir()
    # another cache holding a file of that name that does not load (a disk that filled up mid-copy, say); not
    # the file this process has mapped: a loaded library must never be written in place (the build replaces it)
    corrupt = tmp_path / "b" / "kernels" / built.name
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a shared library")
    monkeypatch.setattr(fused_decode, "_LIBRARY", None)
    monkeypatch.setenv("TINYLLM_HOME", str(tmp_path / "b"))
    assert fused_decode._build().tinyllm_decode_step is not None
    assert corrupt.stat().st_size == built.stat().st_size
