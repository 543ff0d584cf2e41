"""The compiled batch-1 decode step: same tokens as eager decoding and the no-cache oracle, a lone sequence in
any slot, several models in one process, and a clear fallback where it cannot be built."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from engine_helpers import run_to_end

from tinyllm import compiled_decode, fused_decode
from tinyllm.config import ModelConfig
from tinyllm.engine import Engine, Request, generate, generate_naive, stream
from tinyllm.kv_cache import KVCache
from tinyllm.model import GPT
from tinyllm.quantize import prepare_for_inference
from tinyllm.sampling import SamplingParams

CFG = ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
GREEDY = dict(temperature=0.0, max_new_tokens=24, ignore_eos=True)
CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    compiled_decode.unavailable(torch.device("cpu")) is not None, reason="no C++ toolchain for inductor here"
)


def _model(seed: int, config: ModelConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return prepare_for_inference(GPT(config).eval())  # type: ignore[return-value]


@pytest.fixture(scope="module")
def model() -> GPT:
    return _model(0)


@pytest.fixture
def compiled_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the cache length of every compiled step run (so a test sees the engine took that path)."""
    steps: list[int] = []
    call = compiled_decode.CompiledDecoder.__call__

    def counted(self, idx, pos, cache, cache_len):  # noqa: ANN001, ANN202
        steps.append(cache_len)
        return call(self, idx, pos, cache, cache_len)

    monkeypatch.setattr(compiled_decode.CompiledDecoder, "__call__", counted)
    return steps


def test_compiled_greedy_equals_eager_and_the_oracle(model: GPT, compiled_steps: list[int]) -> None:
    prompt = [5, 17, 3, 42, 8]
    engine = Engine(model, max_batch_size=1, compile="inductor")
    assert engine.compiled
    (compiled,) = run_to_end(engine, [prompt], GREEDY)
    # the prefill draws the first token; each of the other 23 came from a compiled step, at lengths 6..28
    assert compiled_steps == list(range(len(prompt) + 1, len(prompt) + 24))
    (eager,) = run_to_end(Engine(model, max_batch_size=1), [prompt], GREEDY)
    (oracle,) = generate_naive(model, [prompt], SamplingParams(**GREEDY), eos_token_id=None)
    assert compiled == eager == oracle
    assert len(compiled) == 24


def test_compiled_logits_match_eager_logits(model: GPT) -> None:
    """One step, compiled and eager, on caches prefilled alike: the same numbers up to summation order."""
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    caches = [KVCache.for_model(CFG, batch_size=1) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model.hidden_states(prompt, input_pos=torch.arange(6), kv_cache=cache)
        decoder = compiled_decode.CompiledDecoder(model)
        decoder.warm_up(caches[0])
        idx, pos = torch.tensor([[7]]), torch.tensor([[6]])
        compiled, greedy = decoder(idx, pos, caches[0].view(slice(0, 1)), 7)  # (1, V), (1,)
        eager = model(idx, input_pos=pos, kv_cache=caches[1])[:, -1]  # (1, V)
    assert compiled.shape == (1, CFG.vocab_size)
    assert torch.equal(greedy, compiled.argmax(dim=-1))  # the argmax computed inside the step
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0].k[1], caches[1].k[1])  # the step wrote the same keys, in place


def test_the_direct_call_equals_dynamos_call(model: GPT) -> None:
    """Calls skip dynamo's frame (the graph is called with an argument list built from the recorded recipe): the
    logits and the cache writes are bit-identical to going through dynamo, in any slot, at any length."""
    engine_cache = KVCache.for_model(CFG, batch_size=3)
    decoder = compiled_decode.CompiledDecoder(model)
    decoder.warm_up(engine_cache)
    assert decoder.direct
    caches = [KVCache.for_model(CFG, batch_size=3) for _ in range(2)]
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        for cache in caches:
            model.hidden_states(prompt, input_pos=torch.arange(5), kv_cache=cache.view(slice(2, 3)))
        direct_slot, dynamo_slot = (c.view(slice(2, 3)) for c in caches)
        for n in range(6, 12):
            idx, pos = torch.tensor([[n * 7 % 97]]), torch.tensor([[n - 1]])
            assert torch.equal(decoder.position(n - 1), pos)  # made once at warm-up, as the engine passes it
            direct = decoder(idx, decoder.position(n - 1), direct_slot, n)
            assert decoder._args[id(direct_slot)][0] is direct_slot  # it took the direct call, not dynamo's
            through_dynamo = decoder._step(model, idx, pos, dynamo_slot, n)
            assert all(torch.equal(a, b) for a, b in zip(direct, through_dynamo, strict=True))
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        assert torch.equal(a, b)
    assert caches[0].k[0][2, :, 10].abs().sum() > 0 and caches[0].k[0][:2].abs().sum() == 0  # slot 2 only


def test_inputs_that_cannot_be_placed_leave_calls_to_dynamo(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    other = _model(4)  # a model not compiled yet: its backend runs (and records) during this test
    monkeypatch.setattr(compiled_decode, "_recipe", lambda inputs, call: None)
    decoder = compiled_decode.CompiledDecoder(other)
    decoder.warm_up(KVCache.for_model(CFG, batch_size=1))
    assert not decoder.direct
    (oracle,) = generate_naive(other, [[8, 1]], SamplingParams(**GREEDY), eos_token_id=None)
    engine = Engine(other, max_batch_size=1)
    engine._compiled = decoder
    assert run_to_end(engine, [[8, 1]], GREEDY) == [oracle]


def test_a_failing_direct_call_leaves_calls_to_dynamo(model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = compiled_decode.CompiledDecoder(model)

    def refuse(self: compiled_decode.CompiledDecoder, *args: object) -> torch.Tensor:
        raise TypeError("this torch's compiled functions take other arguments")

    monkeypatch.setattr(compiled_decode.CompiledDecoder, "_call_direct", refuse)
    decoder.warm_up(KVCache.for_model(CFG, batch_size=1))
    assert not decoder.direct
    engine = Engine(model, max_batch_size=1)
    engine._compiled = decoder
    (oracle,) = generate_naive(model, [[8, 2]], SamplingParams(**GREEDY), eos_token_id=None)
    assert run_to_end(engine, [[8, 2]], GREEDY) == [oracle]


def test_a_lone_sequence_in_a_later_slot_decodes_compiled_and_equals_alone(
    model: GPT, compiled_steps: list[int]
) -> None:
    """Two short requests fill slots 0 and 1 and finish; the long one in slot 2 goes on alone (compiled)."""
    engine = Engine(model, max_batch_size=4, compile="inductor")
    short = dict(temperature=0.0, max_new_tokens=2, ignore_eos=True)
    handles = [engine.submit(Request(prompt=[9, 9], params=SamplingParams(**short))) for _ in range(2)]
    long = engine.submit(Request(prompt=[4, 8, 15, 16, 23, 42], params=SamplingParams(**GREEDY)))
    while engine.has_work():
        engine.step()
    alone = generate(model, [[4, 8, 15, 16, 23, 42]], SamplingParams(**GREEDY), eos_token_id=None)[0]
    assert long.result().token_ids == alone.token_ids
    assert [h.result().completion_tokens for h in handles] == [2, 2]
    assert len(compiled_steps) >= 20  # once the short ones finished, the long one decoded alone, compiled


def test_seeded_sampling_is_reproducible_when_compiled(model: GPT) -> None:
    params = dict(temperature=1.0, top_k=20, seed=1234, max_new_tokens=20, ignore_eos=True)
    first = run_to_end(Engine(model, max_batch_size=1, compile="inductor"), [[3, 1, 4]], params)
    second = run_to_end(Engine(model, max_batch_size=1, compile="inductor"), [[3, 1, 4]], params)
    assert first == second


def test_each_model_gets_its_own_compiled_step(model: GPT, compiled_steps: list[int]) -> None:
    """Dynamo's guards are skipped for speed, so nothing but the per-model code object keeps a model of other sizes
    (a deeper, wider one here) from running the first model's graph; and the first still works afterwards."""
    other = _model(1)
    wider = _model(2, ModelConfig(vocab_size=97, block_size=64, n_layer=3, n_head=4, n_embd=64))
    for m in (model, other, wider, model):
        (compiled,) = run_to_end(Engine(m, max_batch_size=1, compile="inductor"), [[2, 7, 1, 8]], GREEDY)
        (oracle,) = generate_naive(m, [[2, 7, 1, 8]], SamplingParams(**GREEDY), eos_token_id=None)
        assert compiled == oracle
    assert len(compiled_steps) == 4 * 23


def test_stream_and_generate_take_compile(model: GPT, compiled_steps: list[int]) -> None:
    params = SamplingParams(**GREEDY)
    streamed = [t for e in stream(model, [6, 6, 6], params, eos_token_id=None, compile="inductor") for t in e.token_ids]
    assert len(compiled_steps) == 23
    (generated,) = generate(model, [[6, 6, 6]], params, eos_token_id=None, compile="inductor")
    assert len(compiled_steps) == 46
    (eager,) = generate(model, [[6, 6, 6]], params, eos_token_id=None)
    assert streamed == generated.token_ids == eager.token_ids


def test_unavailable_falls_back_to_eager_with_the_reason(
    model: GPT, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(compiled_decode.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    reason = compiled_decode.unavailable(torch.device("cpu"))
    assert reason is not None and "C++ compiler" in reason
    with caplog.at_level(logging.WARNING, logger="tinyllm.engine"):
        engine = Engine(_model(3), max_batch_size=1, compile="inductor")
    assert not engine.compiled
    assert "decoding eagerly: no C++ compiler" in caplog.text
    assert len(run_to_end(engine, [[1, 2]], GREEDY)[0]) == 24  # and it still generates
    assert "is on cuda" in (compiled_decode.unavailable(torch.device("cuda")) or "")


def test_a_failing_compile_leaves_the_engine_eager(
    model: GPT, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: compiled_decode.CompiledDecoder, like: KVCache) -> None:
        raise RuntimeError("C++ compile error: boom")

    monkeypatch.setattr(compiled_decode.CompiledDecoder, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="tinyllm.engine"):
        engine = Engine(model, max_batch_size=2, compile="inductor")
    assert not engine.compiled
    assert "decoding eagerly: building the inductor decode step failed: C++ compile error: boom" in caplog.text
    (oracle,) = generate_naive(model, [[5, 5]], SamplingParams(**GREEDY), eos_token_id=None)
    assert run_to_end(engine, [[5, 5]], GREEDY) == [oracle]


def test_background_compile_switches_over_while_decoding(model: GPT) -> None:
    """The server's way: the engine keeps decoding eagerly while a thread compiles, then runs compiled."""
    engine = Engine(model, max_batch_size=1)
    assert engine.compile_decode(background=True) is None
    prompt = [1, 1, 2, 3, 5, 8]
    long = dict(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    handle = engine.submit(Request(prompt=prompt, params=SamplingParams(**long)))
    while engine.has_work():
        engine.step()
    deadline = time.monotonic() + 120
    while not engine.compiled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.compiled
    (oracle,) = generate_naive(model, [prompt], SamplingParams(**long), eos_token_id=None)
    assert handle.result().token_ids == oracle
    assert run_to_end(engine, [prompt], long) == [oracle]


def test_inductor_options_unknown_to_this_torch_are_left_out() -> None:
    known = compiled_decode._known({"no_such_option": 1, "size_asserts": False, "realize_opcount_threshold": 2})
    assert "no_such_option" not in known and known["size_asserts"] is False


def test_the_server_compiles_in_the_background_and_answers_the_same() -> None:
    from server_helpers import gpt2_tokenizer_or_skip, ready, serving

    from tinyllm.server.settings import ServerSettings

    tok = gpt2_tokenizer_or_skip()
    body = {"prompt": "The future of AI is", "temperature": 0, "max_new_tokens": 20}
    answers = {}
    for compile in (False, True):
        settings = ServerSettings(checkpoint=None, gpt2=None, slots=2, max_queue=4, compile=compile)
        with serving(tok, settings=settings, loaders={"custom": ready(tok)}) as client:
            deadline = time.monotonic() + 120
            while compile and time.monotonic() < deadline:
                if client.get("/ready").json()["models"]["custom"].get("decode") == "compiled":
                    break
                time.sleep(0.1)
            info = client.get("/ready").json()["models"]["custom"]
            assert info["decode"] == ("compiled" if compile else "eager")
            c_here = fused_decode.unavailable(CPU) is None
            assert info["decode_step"] == (("c" if c_here else "inductor") if compile else "eager")
            answers[compile] = client.post("/generate/custom", json=body).json()["generated_text"]
    assert answers[True] == answers[False] and len(answers[True]) > len(body["prompt"])


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"quantize": "int8"}, {"quantize": "int8-dynamic"}])
def test_lossy_modes_compile_or_say_why(options: dict, compiled_steps: list[int]) -> None:
    """bf16 and int8 weight-only compile (the same greedy ids as their eager selves over these 24 tokens; over
    hundreds, bf16's compiled and eager steps round differently and may part: both are a bf16 step's distance
    from fp32); int8-dynamic stays eager."""
    torch.manual_seed(0)
    lossy = prepare_for_inference(GPT(CFG).eval(), **options)
    engine = Engine(lossy, max_batch_size=1, compile="inductor")
    (eager,) = run_to_end(Engine(lossy, max_batch_size=1), [[3, 14, 15]], GREEDY)
    assert run_to_end(engine, [[3, 14, 15]], GREEDY) == [eager]
    assert engine.compiled is (options.get("quantize") != "int8-dynamic")
    assert len(compiled_steps) == (23 if engine.compiled else 0)
    if not engine.compiled:
        assert "int8-dynamic" in (compiled_decode.unavailable(torch.device("cpu"), lossy) or "")
