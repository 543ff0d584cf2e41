"""The engine: cached decoding equals the naive oracle, batching equals decoding alone, stops, limits, streaming."""

from __future__ import annotations

import copy
import queue
import threading

import pytest
import torch
from torch import nn

from tinyllm import assets, fused_decode
from tinyllm.config import ModelConfig
from tinyllm.engine import (
    Engine,
    InvalidPromptError,
    PromptTooLongError,
    QueueFullError,
    Request,
    generate,
    generate_naive,
    stream,
)
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT
from tinyllm.quantize import (
    InferenceOptionError,
    Int8Linear,
    OneDNNLinear,
    huge_page_copy,
    huge_page_zeros,
    huge_page_zeros_like_all,
    onednn_available,
    onednn_rows,
    pack_for_batches,
    prepare_for_inference,
)
from tinyllm.sampling import SamplingError, SamplingParams
from tinyllm.tokenizer import IncrementalDecoder

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
TINY = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32)
PROMPTS = [[1, 2, 3], [7], [4, 5, 6, 7, 8, 9, 10], [11, 12]]


def make_model(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def tiny() -> GPT:
    return make_model(TINY)


@pytest.fixture(scope="module")
def seed_model() -> GPT:
    return make_model(ModelConfig.from_name("seed"))  # 2 layers, n_embd 128, GPT-2's 50257 tokens


# --- fakes: a byte-level tokenizer and a model whose greedy output is a script ----------------------------------------


class ByteTokenizer:
    """Token i is byte i (so every multi-byte character spans tokens); 256 is the end of text."""

    eot_token = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id == self.eot_token else bytes([token_id])

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)  # type: ignore[arg-type]


def tokenizers() -> list[object]:
    params: list[object] = [pytest.param(ByteTokenizer(), id="bytes")]
    if assets.gpt2_ranks_path().exists():
        from tinyllm.tokenizer import get_tokenizer

        params.append(pytest.param(get_tokenizer(), id="gpt2"))
    return params


class ScriptedModel(nn.Module):
    """Greedy decoding reproduces `script`: the token after position p is script[p + 1] (then EOS forever)."""

    def __init__(self, script: list[int], *, vocab_size: int, eos: int, block_size: int = 128) -> None:
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(vocab_size, 8)})
        self.lm_head = nn.Identity()
        self.script = torch.tensor(script + [eos] * (block_size + 1 - len(script)))

    def hidden_states(self, idx: torch.Tensor, *, input_pos=None, kv_cache=None) -> torch.Tensor:  # noqa: ANN001
        B, T = idx.shape
        pos = torch.arange(T) if input_pos is None else input_pos
        target = self.script[pos.expand(B, T) + 1]  # (B, T)
        return torch.zeros(B, T, self.config.vocab_size).scatter_(-1, target.unsqueeze(-1), 10.0)

    def forward(self, idx: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.hidden_states(idx)


def completion(tok: object, text: str) -> str:
    """`text` without its first token (the prompt of a scripted run)."""
    return text[len(tok.decode(tok.encode(text)[:1])) :]  # type: ignore[attr-defined]


def scripted(tok: object, text: str, **params: object) -> tuple[list, object]:
    """Run the script `text` (its first token is the prompt) through `stream`; return (events, result)."""
    ids = tok.encode(text)  # type: ignore[attr-defined]
    model = ScriptedModel(ids, vocab_size=tok.vocab_size, eos=tok.eot_token)  # type: ignore[attr-defined]
    sp = SamplingParams(temperature=0.0, max_new_tokens=100).replace(**params)
    events = list(stream(model, ids[:1], sp, eos_token_id=tok.eot_token, tokenizer=tok))  # type: ignore[attr-defined]
    return events, events[-1].result


# --- the oracles --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["seed", "tiny"])
def test_greedy_with_cache_equals_naive(which: str, seed_model: GPT, tiny: GPT) -> None:
    model = seed_model if which == "seed" else tiny
    expected = generate_naive(model, PROMPTS, GREEDY, eos_token_id=None)
    results = generate(model, PROMPTS, GREEDY, eos_token_id=None)
    assert [r.token_ids for r in results] == expected
    assert all(len(ids) == 12 for ids in expected)
    assert [r.prompt_tokens for r in results] == [len(p) for p in PROMPTS]
    assert all(r.finish_reason == "length" and r.completion_tokens == 12 for r in results)


def test_prepared_fp32_model_keeps_the_oracle(tiny: GPT) -> None:
    fast = prepare_for_inference(copy.deepcopy(tiny))
    if onednn_available():
        assert isinstance(fast.lm_head, OneDNNLinear)
        assert fast.lm_head.weight is fast.transformer.wte.weight  # tying kept
    idx = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        torch.testing.assert_close(fast(idx), tiny(idx), rtol=1e-5, atol=1e-5)
    expected = generate_naive(tiny, PROMPTS, GREEDY, eos_token_id=None)
    assert [r.token_ids for r in generate(fast, PROMPTS, GREEDY, eos_token_id=None)] == expected


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN (CPU builds with mkldnn)")
def test_packed_weights_give_the_plain_weights_results_for_several_rows(seed_model: GPT) -> None:
    fast = prepare_for_inference(copy.deepcopy(seed_model))
    x = torch.randn(3, 5, seed_model.config.n_embd)  # 15 rows
    plain = {name: m(x) for name, m in fast.named_modules() if isinstance(m, OneDNNLinear) and m.in_features == 128}
    # oneDNN's blocked copy (where the C panel kernel cannot be built)
    assert pack_for_batches(fast, 8, panels=False) == 2 * 4 + 1  # 2 layers x (c_attn, c_proj, c_fc, c_proj) + lm_head
    assert fast.lm_head.packed is not None and fast.lm_head.weight is fast.transformer.wte.weight
    assert fast.lm_head.panels is None
    for name, y in plain.items():
        assert torch.equal(fast.get_submodule(name)(x), y), name  # same numbers, faster GEMM
    # the engine packs for its batch: a sequence decoded among others still equals it decoded alone
    together = generate(fast, PROMPTS, GREEDY, eos_token_id=None)
    alone = [generate(fast, [p], GREEDY, eos_token_id=None)[0] for p in PROMPTS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.token_ids for r in together] == generate_naive(seed_model, PROMPTS, GREEDY, eos_token_id=None)


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN (CPU builds with mkldnn)")
@pytest.mark.skipif(fused_decode.unavailable(torch.device("cpu")) is not None, reason="needs a C compiler")
def test_batched_engines_decode_fp32_through_panels_whose_rows_ignore_their_batch_mates(seed_model: GPT) -> None:
    fast = prepare_for_inference(copy.deepcopy(seed_model))
    C = seed_model.config.n_embd
    x = torch.randn(40, C)
    plain = {name: m(x) for name, m in fast.named_modules() if isinstance(m, OneDNNLinear) and m.in_features == C}
    assert pack_for_batches(fast, 32) == 2 * 4 + 1
    head = fast.lm_head
    assert head.panels is not None and head.packed is None and head.panel_rows == 32
    assert head.panels.panels.shape == (-(-50257 // 16), C, 16)  # the last panel: 1 output and 15 zeros
    assert head.weight is fast.transformer.wte.weight  # still tied: the panels are a copy for decoding
    for name, want in plain.items():
        m = fast.get_submodule(name)
        got = m(x[:32])  # one token per row, up to the batch size: through the panels, in passes of 16 rows
        torch.testing.assert_close(got, want[:32], rtol=1e-5, atol=1e-5)  # fp32, another summation order
        # a row's numbers do not depend on the other rows: 1 row, 7, 16 or 32, and for any number of threads
        assert all(torch.equal(m(x[i : i + 1])[0], got[i]) for i in range(32)), name
        assert torch.equal(m(x[:7]), got[:7]) and torch.equal(m(x[:16].view(16, 1, C)).view(16, -1), got[:16])
        # a prompt's tokens (prefill: several per row) stay on oneDNN and the plain weight, whatever the count
        assert torch.equal(m(x[:6].view(2, 3, C)), want[:6].view(2, 3, -1)), name
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(m(x[:32]), got), name
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(m(x), want), name  # more rows than the batch: oneDNN on the plain weight
    assert pack_for_batches(fast, 48) == 9 and head.panel_rows == 48  # a second, larger engine
    with pytest.raises(ValueError, match="float32"):
        head.panels(x.to(torch.bfloat16))
    # the engine packs for its batch: a sequence decoded among others still equals it decoded alone
    together = generate(fast, PROMPTS, GREEDY, eos_token_id=None)
    alone = [generate(fast, [p], GREEDY, eos_token_id=None)[0] for p in PROMPTS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.token_ids for r in together] == generate_naive(seed_model, PROMPTS, GREEDY, eos_token_id=None)


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN (CPU builds with mkldnn)")
def test_prefill_gemms_run_at_a_bounded_set_of_sizes_with_unchanged_results() -> None:
    """oneDNN keeps memory for every GEMM shape it has run: a server fed every prompt length grew by ~6 MB a
    length (GPT-2-124M). Large GEMMs are padded to a few sizes; the padding changes no result."""
    sizes = [onednn_rows(r) for r in range(1, 8193)]
    assert sizes[:16] == list(range(1, 17))  # decode steps (one row per sequence) run as they are
    assert all(r <= s < r * 1.125 for r, s in enumerate(sizes, start=1))
    assert len(set(sizes)) == 16 + 8 * 9  # 8 sizes per octave from 17 to 8192
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    fast = OneDNNLinear(linear)
    with torch.inference_mode():
        for rows in (17, 100, 257):
            x = torch.randn(rows, 96)
            padded = torch.cat([x, torch.zeros(onednn_rows(rows) - rows, 96)])
            unpadded = torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [], "")
            assert torch.equal(fast(x), unpadded) and torch.equal(fast(x.view(1, rows, 96))[0], unpadded)
            assert torch.equal(fast(x), fast(padded)[:rows])
            torch.testing.assert_close(fast(x), linear(x), rtol=1e-5, atol=1e-5)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            fast(torch.randn(2, 50, 96))
    gemms = [e.input_shapes[0] for e in prof.events() if e.name == "mkldnn::_linear_pointwise"]
    assert gemms == [[onednn_rows(100), 96]] == [[104, 96]]  # oneDNN saw the padded size, not 100 rows


@pytest.mark.parametrize(("dtype", "quantize"), [("bfloat16", None), ("float32", "int8"), ("float32", "int8-dynamic")])
def test_lossy_modes_stay_close(tiny: GPT, dtype: str, quantize: str | None) -> None:
    model = prepare_for_inference(copy.deepcopy(tiny), dtype=dtype, quantize=quantize)
    if quantize == "int8":
        assert isinstance(model.lm_head, Int8Linear)
    idx = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        ref, got = tiny(idx), model(idx).float()
    assert (got - ref).abs().max() / ref.abs().max() < 0.05
    results = generate(model, PROMPTS, GREEDY, eos_token_id=None)
    assert [len(r.token_ids) for r in results] == [12] * len(PROMPTS)


def test_int8_linear_matches_float_for_decode_and_prefill_shapes() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8Linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() <= 127
    with torch.inference_mode():
        for rows in (1, 64):  # the fused int8 kernel, then dequantize + float matmul
            x = torch.randn(rows, 64)
            ref = linear(x)
            assert (q(x) - ref).abs().max() / ref.abs().max() < 0.02


def test_huge_page_copies_keep_values_and_ties() -> None:
    t = torch.randn(1 << 20)  # 4 MB: large enough to move
    copied = huge_page_copy(t)
    assert copied is not t and torch.equal(copied, t)
    small = torch.randn(10)
    assert huge_page_copy(small) is small
    zeros = huge_page_zeros(torch.empty(2, 1 << 20))
    assert zeros.shape == (2, 1 << 20) and not zeros.any()
    assert zeros.data_ptr() % (2 << 20) == 0  # starts on a huge page (THP backs only whole aligned ones)
    # a KV cache's many small tensors: views of one arena (cache-line aligned, disjoint), zeros, own shapes
    likes = [torch.empty(1, 12, 144, 64) for _ in range(23)] + [torch.empty(3, 5)]
    views = huge_page_zeros_like_all(likes)
    assert [v.shape for v in views] == [t.shape for t in likes] and not any(v.any() for v in views)
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1 and all(v.data_ptr() % 64 == 0 for v in views)
    views[0].fill_(1.0)
    views[-1].fill_(2.0)
    assert all(not v.any() for v in views[1:-1]) and views[-1].eq(2).all()
    assert [v.shape for v in huge_page_zeros_like_all([torch.empty(3)])] == [(3,)]  # too small: plain zeros
    torch.manual_seed(0)
    original = GPT(ModelConfig(vocab_size=8192, block_size=8, n_layer=1, n_head=1, n_embd=128)).eval()
    model = prepare_for_inference(copy.deepcopy(original))
    assert model.lm_head.weight is model.transformer.wte.weight  # the 4 MB tied weight moved once
    # every parameter now lives in one arena (one mapping, so THP can back nearly all of it), 64-byte aligned
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        assert torch.equal(p, q), name
    idx = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), original(idx), atol=1e-5, rtol=1e-5)


def test_bad_inference_options_are_rejected(tiny: GPT) -> None:
    with pytest.raises(InferenceOptionError, match="dtype must be one of"):
        prepare_for_inference(copy.deepcopy(tiny), dtype="float16")
    with pytest.raises(InferenceOptionError, match="quantize must be None or one of"):
        prepare_for_inference(copy.deepcopy(tiny), quantize="int4")


def test_sequence_in_a_batch_equals_it_alone(seed_model: GPT) -> None:
    params = [
        GREEDY,
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1, max_new_tokens=9),
        SamplingParams(temperature=0.8, seed=2, max_new_tokens=12, repetition_penalty=1.3),
        SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05, seed=3, max_new_tokens=5, frequency_penalty=1.0),
    ]
    together = generate(seed_model, PROMPTS, params, eos_token_id=None)
    alone = [generate(seed_model, [p], sp, eos_token_id=None)[0] for p, sp in zip(PROMPTS, params, strict=True)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in together] == [12, 9, 12, 5]
    naive = generate_naive(seed_model, PROMPTS, params, eos_token_id=None)  # sampled: same seeds, same draws
    assert [r.token_ids for r in together] == naive


def test_prompts_prefilled_together_equal_them_alone(seed_model: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15], [1, 2, 3, 4, 5, 6], [20, 21, 22, 23], list(range(30, 50))]
    params = [GREEDY, SamplingParams(temperature=0.9, seed=4, max_new_tokens=12)] * 2 + [GREEDY]
    groups: list[list[int]] = []
    prefill = Engine._prefill

    def spy(self: Engine, seqs: list) -> list:
        groups.append([len(s.prompt) for s in seqs])
        return prefill(self, seqs)

    monkeypatch.setattr(Engine, "_prefill", spy)
    together = generate(seed_model, prompts, params, eos_token_id=None)
    assert groups == [[5, 6, 6, 4], [20]]  # adjacent slots, similar lengths: one padded prefill; the long one apart
    alone = [generate(seed_model, [p], sp, eos_token_id=None)[0] for p, sp in zip(prompts, params, strict=True)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.token_ids for r in together] == generate_naive(seed_model, prompts, params, eos_token_id=None)


def test_engine_with_requests_joining_midway_equals_alone(tiny: GPT) -> None:
    prompts = PROMPTS + [[20, 21, 22, 23, 24], [30]]
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_new_tokens=4 + 3 * i) for i in range(len(prompts))
    ]
    alone = [generate(tiny, [p], sp, eos_token_id=None)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(tiny, max_batch_size=3, max_queue=10)
    handles = {}
    for step in range(200):
        if step % 3 == 0 and len(handles) < len(prompts):  # a new request every third step
            i = len(handles)
            handles[i] = engine.submit(Request(prompt=prompts[i], params=params[i], request_id=f"r{i}"))
        assert engine.num_active <= 3
        engine.step()
        if len(handles) == len(prompts) and not engine.has_work():
            break
    assert [handles[i].result().token_ids for i in range(len(prompts))] == alone
    streamed = [[t for e in handles[i].events(timeout=0) for t in e.token_ids] for i in range(len(prompts))]
    assert streamed == alone
    assert engine.num_active == 0 and engine.num_waiting == 0


def test_same_seed_same_output_and_greedy_is_deterministic(tiny: GPT) -> None:
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=42, max_new_tokens=16)

    def run(params: SamplingParams) -> list[int]:
        return generate(tiny, [[1, 2]], params, eos_token_id=None)[0].token_ids

    assert run(sp) == run(sp)
    assert run(sp) != run(sp.replace(seed=43))
    assert run(GREEDY) == run(GREEDY.replace(seed=5))


# --- stopping -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tok", tokenizers())
def test_stop_string_spanning_tokens_cuts_the_text(tok: object) -> None:
    text = "The cat sat on the mat. END of story"
    events, result = scripted(tok, text, stop=("zzz", "at. EN"))
    assert result.finish_reason == "stop" and result.stop_reason == "at. EN"
    assert result.text == completion(tok, text).split("at. EN")[0]
    assert result.text.endswith(" cat sat on the m")
    assert "".join(e.text for e in events) == result.text  # the stream never leaked part of the stop string
    assert "at. EN" in tok.decode(result.token_ids)  # type: ignore[attr-defined]


@pytest.mark.parametrize("tok", tokenizers())
def test_partial_stop_match_is_held_back_then_released(tok: object) -> None:
    text = "The cat. Every cat. END"
    events, result = scripted(tok, text, stop=("at. EN",))
    assert result.text == completion(tok, text)[: -len("at. END")]
    deltas = [e.text for e in events]
    assert "".join(deltas) == result.text
    sent = ["".join(deltas[: i + 1]) for i in range(len(deltas))]
    assert not any(s.endswith(("at.", "at. ")) for s in sent)  # a possible stop start is held back...
    assert any(s.endswith("at. Ev") or s.endswith("at. Every") for s in sent)  # ...and let go when "v" breaks it


@pytest.mark.parametrize("tok", tokenizers())
def test_streamed_utf8_is_never_broken(tok: object) -> None:
    text = "Start: héllo wörld 😀 — 日本語 ✓ end"
    events, result = scripted(tok, text)
    deltas = [e.text for e in events if e.text]
    assert "".join(deltas) == result.text == completion(tok, text)
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) > 5  # really streamed, not one final flush
    assert result.finish_reason == "stop" and result.stop_reason == tok.eot_token  # type: ignore[attr-defined]


def test_decode_callable_gives_the_same_deltas() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("aé😀b|x")
    model = ScriptedModel(ids, vocab_size=257, eos=256)
    sp = SamplingParams(temperature=0, max_new_tokens=50, stop=("|",))
    with_decode = list(stream(model, ids[:1], sp, eos_token_id=256, decode=tok.decode))
    with_tok = list(stream(model, ids[:1], sp, eos_token_id=256, tokenizer=tok))
    assert [e.text for e in with_decode if e.text] == [e.text for e in with_tok if e.text] == ["é", "😀", "b"]
    assert with_decode[-1].result.text == "é😀b"


def test_eos_and_stop_token_ids() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("abcdef")
    model = ScriptedModel(ids, vocab_size=257, eos=256)
    (r,) = generate(model, [ids[:2]], SamplingParams(temperature=0), eos_token_id=256, tokenizer=tok)
    assert r.finish_reason == "stop" and r.stop_reason == 256
    assert r.token_ids == ids[2:] + [256] and r.text == "cdef" and r.completion_tokens == 5
    (r,) = generate(
        model, [ids[:2]], SamplingParams(temperature=0, ignore_eos=True, max_new_tokens=7), eos_token_id=256
    )
    assert r.finish_reason == "length" and r.token_ids == ids[2:] + [256] * 3 and r.text is None
    sp = SamplingParams(temperature=0, stop_token_ids=(ord("e"),))
    (r,) = generate(model, [ids[:2]], sp, eos_token_id=256, tokenizer=tok)
    assert r.finish_reason == "stop" and r.stop_reason == ord("e") and r.text == "cd" and r.token_ids[-1] == ord("e")


# --- limits -------------------------------------------------------------------------------------------------------


def test_context_limit_ends_with_length_and_long_prompts_are_rejected(tiny: GPT) -> None:
    limit = TINY.block_size
    sp = SamplingParams(temperature=0, max_new_tokens=100)
    (r,) = generate(tiny, [[1] * (limit - 1)], sp, eos_token_id=None)
    assert r.finish_reason == "length" and r.completion_tokens == 1
    (r,) = generate(tiny, [[1] * 10], sp, eos_token_id=None)
    assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens == limit
    with pytest.raises(PromptTooLongError, match=f"32 tokens but the context holds {limit}") as info:
        generate(tiny, [[1] * limit], sp, eos_token_id=None)
    assert isinstance(info.value, TinyLLMError)
    (r,) = generate(tiny, [list(range(40))], sp.replace(max_new_tokens=4), eos_token_id=None, truncate=True)
    assert r.prompt_truncated == 12 and r.prompt_tokens == 28 and r.completion_tokens == 4
    # allowed to cut, a prompt that fits but leaves no room is cut too: a longer prompt never gets more tokens
    four = sp.replace(max_new_tokens=4)
    counts = [generate(tiny, [list(range(n))], four, eos_token_id=None, truncate=True)[0] for n in (26, 30, 31, 32)]
    assert [(r.prompt_truncated, r.completion_tokens) for r in counts] == [(0, 4), (2, 4), (3, 4), (4, 4)]
    (r,) = generate(tiny, [[1] * 10], sp, eos_token_id=None, max_seq_len=16)
    assert r.finish_reason == "length" and r.completion_tokens == 6


def test_invalid_prompts_and_stop_strings_without_text(tiny: GPT) -> None:
    with pytest.raises(InvalidPromptError, match="empty"):
        generate(tiny, [[]], GREEDY, eos_token_id=None)
    with pytest.raises(InvalidPromptError, match=r"in \[0, 96\)"):
        generate(tiny, [[5, 96]], GREEDY, eos_token_id=None)
    with pytest.raises(SamplingError, match="stop strings need text"):
        generate(tiny, [[5]], GREEDY.replace(stop=("x",)), eos_token_id=None)
    with pytest.raises(SamplingError, match="2 SamplingParams for 1 prompts"):
        generate(tiny, [[5]], [GREEDY, GREEDY], eos_token_id=None)


def test_cancel_frees_the_slot_at_once(tiny: GPT) -> None:
    engine = Engine(tiny, max_batch_size=1)
    sp = SamplingParams(temperature=0, max_new_tokens=20)
    a = engine.submit(Request(prompt=[1, 2], params=sp))
    b = engine.submit(Request(prompt=[3], params=sp))
    engine.step()
    assert engine.num_active == 1 and engine.num_waiting == 1
    assert engine.cancel(a)
    assert engine.num_active == 0 and a.done
    assert a.result().finish_reason == "cancelled" and len(a.result().token_ids) == 2  # prefill + one decode
    assert not engine.cancel(a)
    engine.step()
    assert engine.num_active == 1 and engine.num_waiting == 0  # b took the slot
    c = engine.submit(Request(prompt=[4], params=sp))
    assert engine.cancel(c.request_id) and c.result().token_ids == []  # cancelled while waiting
    while engine.has_work():
        engine.step()
    assert b.result().token_ids == generate(tiny, [[3]], sp, eos_token_id=None)[0].token_ids


def test_a_row_that_cannot_be_sampled_fails_alone(tiny: GPT, monkeypatch: pytest.MonkeyPatch) -> None:
    """One request's non-finite logits failed every request decoded in the same step."""
    from tinyllm import sampling

    real = sampling._sample_row

    def broken_for_one(logits, params, *rest):  # noqa: ANN001, ANN002, ANN202
        if params.temperature == 0.7:  # this request's numbers broke
            raise SamplingError("cannot sample: the model's logits hold NaN or inf")
        return real(logits, params, *rest)

    sampled = SamplingParams(temperature=1.0, seed=3, max_new_tokens=6, top_k=0)
    alone = [
        generate(tiny, [[1, 2]], GREEDY, eos_token_id=None)[0],
        generate(tiny, [[3]], sampled, eos_token_id=None)[0],
    ]
    monkeypatch.setattr(sampling, "_sample_row", broken_for_one)
    engine = Engine(tiny, max_batch_size=3)
    handles = [
        engine.submit(Request(prompt=[1, 2], params=GREEDY)),
        engine.submit(Request(prompt=[5], params=sampled.replace(temperature=0.7))),
        engine.submit(Request(prompt=[3], params=sampled)),
    ]
    while engine.has_work():
        engine.step()
    results = [h.result() for h in handles]
    assert results[1].finish_reason == "error" and "NaN or inf" in results[1].error
    assert [r.token_ids for r in (results[0], results[2])] == [r.token_ids for r in alone]  # as if decoded alone
    with pytest.raises(SamplingError, match="NaN or inf"):  # called without `errors`, sample still raises
        sampling.sample(torch.zeros(1, 4), sampled.replace(temperature=0.7))


def test_queue_full_raises(tiny: GPT) -> None:
    engine = Engine(tiny, max_batch_size=1, max_queue=2)
    for _ in range(3):  # one for the free slot, two queued
        engine.submit(Request(prompt=[1]))
    with pytest.raises(QueueFullError, match=r"queue is full \(2 requests waiting\)"):
        engine.submit(Request(prompt=[1]))
    assert isinstance(QueueFullError("x"), TinyLLMError)
    engine.step()
    assert engine.num_active == 1 and engine.num_waiting == 2
    with pytest.raises(QueueFullError):
        engine.submit(Request(prompt=[1]))


def test_worker_thread_serves_concurrent_consumers(tiny: GPT) -> None:
    engine = Engine(tiny, max_batch_size=2, eos_token_id=None)
    stop = threading.Event()
    worker = threading.Thread(target=engine.run, args=(stop,), kwargs={"idle_wait_s": 0.01}, daemon=True)
    worker.start()
    params = [SamplingParams(temperature=0.9, seed=i, max_new_tokens=6) for i in range(4)]
    try:
        handles = [engine.submit(Request(prompt=p, params=sp)) for p, sp in zip(PROMPTS, params, strict=True)]
        got = [[t for d in h.token_deltas(timeout=30) for t in d] for h in handles]
        callback_events: queue.Queue = queue.Queue()
        engine.submit(Request(prompt=[5], params=params[0]), on_event=callback_events.put)
        while not (event := callback_events.get(timeout=30)).finished:
            pass
    finally:
        stop.set()
        engine.wake()
        worker.join(timeout=10)
    assert not worker.is_alive()
    expected = [r.token_ids for r in generate(tiny, PROMPTS, params, eos_token_id=None)]
    assert got == expected
    assert event.result is not None and len(event.result.token_ids) == 6


def test_logprobs_for_requests_that_ask(tiny: GPT) -> None:
    params = [SamplingParams(temperature=0, max_new_tokens=3, logprobs=True, top_logprobs=5), GREEDY]
    with_lp, without = generate(tiny, [[1, 2, 3], [4]], params, eos_token_id=None)
    assert without.logprobs is None
    assert [lp.token_id for lp in with_lp.logprobs] == with_lp.token_ids
    with torch.inference_mode():
        logits = tiny(torch.tensor([[1, 2, 3]]))[0, -1]
    expected = torch.log_softmax(logits, -1)
    first = with_lp.logprobs[0]
    assert first.logprob == pytest.approx(float(expected[first.token_id]), abs=1e-5)
    assert len(first.top) == 5 and first.top[0][0] == first.token_id  # greedy: the chosen one is the best
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)


@pytest.mark.skipif(not assets.gpt2_ranks_path().exists(), reason="needs the GPT-2 BPE ranks (tinyllm fetch-assets)")
def test_cli_generate(tmp_path, capsys) -> None:  # noqa: ANN001
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.cli import main

    config = ModelConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "ckpt", model=make_model(config))
    args = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "5"]
    assert main([*args, "--temperature", "0", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--temperature", "0", "--stream", "--compile"]) == 0  # the C step where a compiler is
    assert capsys.readouterr().out == streamed
    assert main([*args, "--temperature", "0", "--quantize", "int8"]) == 0
    assert streamed.startswith("Hello") and len(streamed) > len("Hello\n")
    assert capsys.readouterr().out.startswith("Hello")
    assert main([*args, "--top-p", "2"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
