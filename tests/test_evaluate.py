"""Bits per byte, the sliding window against a brute-force oracle, repetition metrics and samples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tinyllm import evaluate as ev
from tinyllm.config import ModelConfig
from tinyllm.evaluate import (
    EvaluationError,
    distinct_n,
    evaluate_model,
    evaluate_tokens,
    generation_metrics,
    held_out_stream,
    repeated_ngram_share,
    sliding_windows,
    text_bytes,
)
from tinyllm.model import GPT


class UniformModel(nn.Module):
    """Logits all zero: every token has probability 1/V."""

    def __init__(self, vocab_size: int, block_size: int = 8) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = block_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab_size)


def tiny_gpt(vocab_size: int = 37, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16)).eval()


# --- bits per byte ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_tokens", "vocab", "num_bytes"), [(50, 7, 123), (9, 50257, 31), (2, 2, 1)])
def test_uniform_model_gives_log2_vocab_bits_per_token(n_tokens, vocab, num_bytes):
    tokens = np.random.default_rng(0).integers(0, vocab, size=n_tokens)
    result = evaluate_tokens(UniformModel(vocab), tokens, num_bytes=num_bytes, context=8, stride=3)
    scored = n_tokens - 1
    assert result.tokens_scored == scored and result.bytes == num_bytes
    assert result.bits_per_byte == pytest.approx(math.log2(vocab) * scored / num_bytes, rel=1e-6)
    assert result.loss_nats_per_token == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)
    assert "stride 3" in result.method and "context 8" in result.method


def _brute_force_nats(model: GPT, tokens: torch.Tensor, *, context: int, stride: int) -> tuple[float, int]:
    """Score each token p from scratch with the left context the method promises it, and that context's minimum."""
    total, min_ctx = 0.0, 10**9
    for p in range(1, len(tokens)):
        start = 0 if p <= context else math.ceil((p - context) / stride) * stride
        ctx = tokens[start:p]
        if p > context:
            min_ctx = min(min_ctx, len(ctx))
        logits = model(ctx.unsqueeze(0))[0, -1].double()
        total -= torch.log_softmax(logits, dim=-1)[tokens[p]].item()
    return total, min_ctx


@pytest.mark.parametrize(
    ("n_tokens", "context", "stride"),
    [(53, 16, 8), (53, 16, 16), (53, 16, 1), (40, 8, 3), (45, 16, 5), (10, 16, 8), (17, 16, 8), (18, 16, 8)],
)
def test_sliding_window_equals_brute_force(n_tokens, context, stride):
    model = tiny_gpt()
    tokens = torch.randint(0, 37, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    result = evaluate_tokens(model, tokens, num_bytes=100, context=context, stride=stride, batch_size=3)
    with torch.no_grad():
        expected, min_ctx = _brute_force_nats(model, tokens, context=context, stride=stride)
    assert result.tokens_scored == n_tokens - 1
    assert result.total_nats == pytest.approx(expected, rel=1e-5)
    if n_tokens - 1 > context:
        assert min_ctx >= context - stride  # every token after the first window has enough context


@pytest.mark.parametrize(("n", "context", "stride"), [(100, 16, 8), (17, 16, 4), (2, 16, 8), (50, 7, 7)])
def test_windows_score_every_token_exactly_once(n, context, stride):
    scored = []
    for start, length, k in sliding_windows(n, context=context, stride=stride):
        assert 1 <= length <= context and 1 <= k <= length
        scored += range(start + length - k + 1, start + length + 1)
    assert scored == list(range(1, n))


def test_defaults_and_max_tokens():
    model = tiny_gpt(block_size=16)
    tokens = np.arange(40) % 37
    full = evaluate_tokens(model, tokens, num_bytes=10)
    assert (full.context, full.stride) == (16, 8)
    counted = []
    prefix = evaluate_tokens(model, tokens, num_bytes=lambda a: counted.append(len(a)) or 5, max_tokens=10)
    assert prefix.tokens_scored == 10 and prefix.bytes == 5 and counted == [11]
    brute, _ = _brute_force_nats(model, torch.as_tensor(tokens[:11]), context=16, stride=8)
    assert prefix.total_nats == pytest.approx(brute, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(context=17), "longer than the model's block_size"),
        (dict(context=8, stride=9), "stride must be in"),
        (dict(num_bytes=0), "bytes"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(context=0), "context must be a positive number"),  # not the default in disguise
        (dict(context=8, stride=0), "stride must be in"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, message):
    kwargs = {"num_bytes": 10, **kwargs}
    with pytest.raises(EvaluationError, match=message):
        evaluate_tokens(tiny_gpt(), np.arange(20), **kwargs)


def test_a_single_token_cannot_be_scored():
    with pytest.raises(EvaluationError, match="at least 2 tokens"):
        evaluate_tokens(tiny_gpt(), np.array([3]), num_bytes=1)


# --- held-out text: bytes match the tokens ---------------------------------------------------------


def test_text_files_stream_counts_every_byte(gpt2_tokenizer, tmp_path):
    texts = ["Hello, world! Ünïcödé ✓\n", "To be, or not to be: that is the question.\n"]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"d{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    tokens, nbytes, what = held_out_stream(paths, tokenizer=gpt2_tokenizer)
    eot = gpt2_tokenizer.eot_token
    assert nbytes == sum(len(t.encode()) for t in texts) == text_bytes(tokens, tokenizer=gpt2_tokenizer)
    assert tokens[0] == eot and tokens[-1] == eot and list(tokens).count(eot) == 3
    assert "d0.txt" in what


def test_prepared_split_bytes_match_its_tokens(tinyllm_home, gpt2_tokenizer, tmp_path):
    from tinyllm.data import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"Document {i}: sweet — ‘ünïcode’ prose.\n" * (3 + i))
    data = prepare([corpus], val_fraction=0.34, progress=False)
    tokens, nbytes, _ = held_out_stream(data, tokenizer=gpt2_tokenizer)
    assert nbytes == data.num_bytes("val") == text_bytes(tokens, tokenizer=gpt2_tokenizer)
    assert len(tokens) == data.num_tokens("val") + 1

    model = tiny_gpt(vocab_size=gpt2_tokenizer.vocab_size)
    result = evaluate_model(model, data=data)
    assert result.tokens_scored == data.num_tokens("val") and result.bytes == nbytes
    assert result.context == 16 and result.stride == 8
    # A prefix counts the bytes of its own tokens, by decoding them.
    prefix = evaluate_model(model, data=data, max_tokens=5)
    assert prefix.tokens_scored == 5
    assert prefix.bytes == len(gpt2_tokenizer.decode(tokens[1:6].tolist()).encode())
    # A byte budget that ends with a document takes the end-of-text after it only if the model whose prefix set
    # the budget was charged for predicting it (compare --max-tokens charged one model alone for it)
    first_doc = int(np.argmax(tokens[1:] == gpt2_tokenizer.eot_token))  # tokens before the first separator
    budget = text_bytes(tokens[: first_doc + 1], tokenizer=gpt2_tokenizer)
    without_end = evaluate_model(model, data=data, max_tokens=first_doc)
    with_end = evaluate_model(model, data=data, max_tokens=first_doc + 1)
    assert (without_end.bytes, without_end.ends_scored, with_end.bytes, with_end.ends_scored) == (budget, 0, budget, 1)
    for other in (without_end, with_end):
        by_bytes = evaluate_model(model, data=data, max_bytes=other.bytes, max_ends=other.ends_scored)
        assert (by_bytes.tokens_scored, by_bytes.bytes, by_bytes.ends_scored) == (
            other.tokens_scored,
            other.bytes,
            other.ends_scored,
        )
    whole = evaluate_model(model, data=data)  # the whole stream ends with a document end: charged to both
    assert whole.ends_scored == data.meta["splits"]["val"]["documents"]
    again = evaluate_model(model, data=data, max_bytes=whole.bytes, max_ends=whole.ends_scored)
    assert again.tokens_scored == whole.tokens_scored


def test_evaluate_model_rejects_tokens_past_the_vocabulary(gpt2_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Hello there, general Kenobi.")
    with pytest.raises(EvaluationError, match="past the model's vocabulary"):
        evaluate_model(tiny_gpt(vocab_size=37), data=[path])


# --- repetition metrics on fixed strings ----------------------------------------------------------


def W(text: str) -> list[str]:
    return text.split()


def test_distinct_n_on_fixed_strings():
    assert distinct_n([W("a b a c")], n=1) == pytest.approx(3 / 4)
    assert distinct_n([W("a b a b")], n=2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n([W("a b"), W("a c")], n=1) == pytest.approx(3 / 4)  # pooled
    assert distinct_n([[]], n=2) == 0.0


def test_repeated_4gram_share_on_fixed_strings():
    assert repeated_ngram_share([W("a b c d a b c d")], n=4) == pytest.approx(1 / 5)  # abcd repeats once
    assert repeated_ngram_share([W("a a a a a a")], n=4) == pytest.approx(2 / 3)  # overlapping repeats count
    assert repeated_ngram_share([W("a b c d e f")], n=4) == 0.0
    # Repeats are within a sequence: the same 4-gram in two continuations is not a repeat.
    assert repeated_ngram_share([W("a b c d"), W("a b c d")], n=4) == 0.0
    assert repeated_ngram_share([W("a b c")], n=4) == 0.0


def test_generation_metrics_on_ids_and_words():
    ids = [[1, 2, 3, 4, 1, 2, 3, 4], [5, 6]]
    m = generation_metrics(ids, texts=["the cat sat on the cat sat on the mat", "hello"])
    assert m.samples == 2 and m.mean_length_tokens == 5.0
    assert m.distinct_1 == pytest.approx(6 / 10)
    assert m.distinct_2 == pytest.approx(5 / 8)  # 12 23 34 41 12 23 34 | 56
    assert m.repeated_4gram_share == pytest.approx(1 / 5)
    assert m.distinct_1_words == pytest.approx(6 / 11)
    assert m.repeated_4gram_share_words == pytest.approx(2 / 7)  # "the cat sat on", "cat sat on the" again


def test_prompt_file_and_default_prompts_agree():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts.txt"
    assert tuple(ev.load_prompts(path)) == ev.DEFAULT_PROMPTS
    assert "The future of AI is" in ev.DEFAULT_PROMPTS


def test_load_prompts_errors(tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(EvaluationError, match="no prompts"):
        ev.load_prompts(empty)
    with pytest.raises(EvaluationError, match="cannot read"):
        ev.load_prompts(tmp_path / "missing.txt")


# --- samples and the comparison ---------------------------------------------------------------------


def test_samples_are_seeded_and_measured(gpt2_tokenizer):
    from tinyllm.sampling import SamplingParams

    model = tiny_gpt(vocab_size=gpt2_tokenizer.vocab_size, block_size=32)
    params = SamplingParams(max_new_tokens=12)
    prompts = ["The future of AI is", "ROMEO:"]
    first = ev.generate_samples(model, prompts, params=params, seeds=(1, 2))
    again = ev.generate_samples(model, prompts, params=params, seeds=(1, 2))
    assert first == again  # fixed seeds: the same continuations every time
    assert [(s.prompt, s.seed) for s in first] == [(p, seed) for seed in (1, 2) for p in prompts]
    for s in first:
        assert 1 <= len(s.token_ids) <= 12 and gpt2_tokenizer.eot_token not in s.token_ids
        assert s.text == gpt2_tokenizer.decode(s.token_ids)


def test_compare_reports_unavailable_gpt2(gpt2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = tmp_path / "heldout.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York.\n" * 3)
    model = tiny_gpt(vocab_size=gpt2_tokenizer.vocab_size, block_size=32)
    from tinyllm.sampling import SamplingParams

    results = ev.compare_models(
        custom=model,
        gpt2=str(tmp_path / "no-gpt2-here"),
        prompts=["The future of AI is"],
        data=[text],
        params=SamplingParams(max_new_tokens=8),
    )
    custom, gpt2 = results
    assert custom.eval is not None and custom.eval.bytes == len(text.read_bytes())
    assert custom.metrics is not None and custom.metrics.samples == 1
    assert gpt2.eval is None and gpt2.samples == [] and "not available" in gpt2.unavailable
    offline = ev.measure_model("GPT-2", "nobody/no-such-gpt2", gpt2=True, prompts=[], data=[text])
    assert offline.unavailable and "offline" in offline.unavailable


# --- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path, gpt2_tokenizer):
    from tinyllm.checkpoint import save_checkpoint

    text = tmp_path / "heldout.txt"
    text.write_text("But soft, what light through yonder window breaks? It is the east.\n" * 4)
    run = tmp_path / "run"
    save_checkpoint(run / "best", model=tiny_gpt(vocab_size=gpt2_tokenizer.vocab_size, block_size=32))
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 10, "tokens": 100, "loss": 9.0}\n')
    return run, text


def test_cli_evaluate_prints_bits_per_byte(tiny_checkpoint, capsys):
    import json

    from tinyllm.cli import main

    run, text = tiny_checkpoint
    argv = ["evaluate", "--model", str(run), "--data", str(text), "--stride", "8", "--device", "cpu", "--json"]
    assert main(argv) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert model["eval"]["bytes"] == len(text.read_bytes()) and model["eval"]["stride"] == 8
    assert model["eval"]["context"] == 32 and model["samples"] == []


def test_cli_evaluate_says_sampling_options_need_prompts(tiny_checkpoint, capsys, caplog):
    from tinyllm.cli import main

    run, text = tiny_checkpoint
    argv = ["evaluate", "--model", str(run), "--data", str(text), "--device", "cpu", "--json"]
    assert main([*argv, "--seed", "1", "2"]) == 0
    assert "--seed and --max-new-tokens shape the samples, and there are none without --prompts" in caplog.text
    caplog.clear()
    assert main(argv) == 0
    assert "--prompts" not in caplog.text


def test_cli_compare_shows_gpt2_unavailable_and_writes_a_report(tiny_checkpoint, tmp_path, capsys):
    from tinyllm.cli import main

    run, text = tiny_checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The future of AI is\nROMEO:\n")
    argv = ["compare", "--prompts", str(prompts), "--custom", str(run), "--gpt2", str(tmp_path / "no-gpt2")]
    argv += ["--data", str(text), "--max-new-tokens", "6", "--device", "cpu", "--report", str(tmp_path / "report")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "GPT-2 unavailable: " in out and "--- 'ROMEO:' (seed 1337)" in out and "custom | ROMEO:" in out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "GPT-2 unavailable: " in md and "loss_curves.png" in md and "bits_per_byte.png" in md


def test_cli_evaluate_missing_model_is_a_user_error(tmp_path, capsys):
    from tinyllm.cli import main

    assert main(["evaluate", "--model", str(tmp_path / "nothing"), "--data", "x.txt", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no model at" in err and len(err.strip().splitlines()) == 1


def test_a_split_prepared_with_gpt2_is_scored_in_the_models_own_tokens(tinyllm_home, gpt2_tokenizer, tmp_path):
    """A model with a trained tokenizer, evaluated on GPT-2-prepared data: the same text, its own tokens."""
    from tinyllm.data import prepare
    from tinyllm.tokenizer import train_bpe

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"Document {i}: sweet — ‘ünïcode’ prose, line {i}.\n" * (3 + i) for i in range(6)]
    for i, text in enumerate(texts):
        (corpus / f"d{i}.txt").write_text(text)
    data = prepare([corpus], val_fraction=0.34, progress=False)
    assert data.meta["tokenizer"] == "gpt2"
    trained = train_bpe(texts, vocab_size=300)
    tokens, nbytes, _ = held_out_stream(data, tokenizer=trained)
    assert nbytes == data.num_bytes("val") == text_bytes(tokens, tokenizer=trained)
    # Document by document, exactly the trained tokenizer's encoding of the held-out text.
    gpt2_text = gpt2_tokenizer.decode(np.asarray(data.tokens("val")).tolist())
    docs = gpt2_text.split("<|endoftext|>")[:-1]
    expected = [trained.eot_token] + [t for doc in docs for t in [*trained.encode(doc), trained.eot_token]]
    assert tokens.tolist() == expected
    assert max(tokens) < trained.vocab_size
    result = evaluate_model(tiny_gpt(vocab_size=trained.vocab_size), data=data, tokenizer=trained)
    assert result.bytes == nbytes and result.tokens_scored == len(expected) - 1


def test_compare_with_max_tokens_scores_the_same_bytes_across_tokenizers(gpt2_tokenizer, tmp_path):
    """--max-tokens cut each model's own first N tokens: a 300-token BPE and GPT-2's spelled different text."""
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.export import export_hf
    from tinyllm.tokenizer import train_bpe

    text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 40
    (tmp_path / "heldout.txt").write_text(text)
    bpe = train_bpe([text], vocab_size=300)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "custom", model=GPT(ModelConfig(vocab_size=300, block_size=64, n_layer=1, n_head=2,
                                                               n_embd=16)), tokenizer=bpe)  # fmt: skip
    save_checkpoint(tmp_path / "g", model=GPT(ModelConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)))
    export_hf(tmp_path / "g", tmp_path / "gpt2")
    custom, gpt2 = ev.compare_models(
        custom=str(tmp_path / "custom"), gpt2=str(tmp_path / "gpt2"), prompts=[],
        data=[tmp_path / "heldout.txt"], max_tokens=60,
    )  # fmt: skip
    assert custom.eval.tokens_scored == 60
    longest = max(len(gpt2_tokenizer.token_bytes(t)) for t in gpt2_tokenizer.encode(text))
    assert custom.eval.bytes - longest < gpt2.eval.bytes <= custom.eval.bytes  # the same text, to within a token
    assert gpt2.eval.tokens_scored != 60


def test_a_model_with_nan_weights_reports_without_crashing(tiny_checkpoint, tmp_path, capsys):
    """The report's plot raised on NaN axis limits (after the evaluation, before the results were printed), and
    --json printed a bare NaN, which strict JSON parsers reject."""
    import json

    from tinyllm.checkpoint import load_checkpoint, save_checkpoint
    from tinyllm.cli import main

    run, text = tiny_checkpoint
    broken = load_checkpoint(run / "best")
    with torch.no_grad():
        broken.model.transformer.ln_f.weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan", model=broken.model)
    argv = ["evaluate", "--model", str(tmp_path / "nan"), "--data", str(text), "--device", "cpu", "--json"]
    assert main([*argv, "--report", str(tmp_path / "report")]) == 0
    body = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert body["models"][0]["eval"]["bits_per_byte"] is None
    assert (tmp_path / "report" / "bits_per_byte.png").exists()
    # with samples asked for (compare always asks), their failure no longer loses the scores
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n")
    assert main([*argv, "--prompts", str(prompts), "--report", str(tmp_path / "report2")]) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert model["eval"]["bits_per_byte"] is None and model["samples"] == []
    assert "NaN or inf" in model["samples_unavailable"]
    assert "model: no samples (cannot sample" in (tmp_path / "report2" / "report.md").read_text()


# --- which text is held out ------------------------------------------------------------------------------


@pytest.fixture
def run_on_a_folder(tinyllm_home, gpt2_tokenizer, tmp_path):
    """A checkpoint recorded as trained on a folder of 10 documents (its metadata as training writes it)."""
    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.data import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"doc{i}.txt").write_text(f"Document number {i} says something of its own, {i * 7} times.\n")
    data = prepare([corpus], val_fraction=0.1, progress=False)
    meta = {
        "tokenizer": "gpt2",
        "train_config": {"data": [str(corpus)], "val_fraction": 0.1},
        "data_sources": data.meta["sources"],
        "data_split": {k: data.meta[k] for k in ("seed", "val_threshold", "documents")},
    }
    run = save_checkpoint(tmp_path / "run" / "best", model=tiny_gpt(vocab_size=gpt2_tokenizer.vocab_size), meta=meta)
    return run.parent, corpus, data


def _val_text(data) -> str:  # noqa: ANN001
    from tinyllm.tokenizer import get_tokenizer

    return get_tokenizer().decode([int(t) for t in data.tokens("val")])


def test_after_documents_are_added_the_documents_held_out_in_training_are_scored(run_on_a_folder, caplog):
    run, corpus, then = run_on_a_folder
    assert ev.training_heldout(run).dir == then.dir and "changed" not in caplog.text  # unchanged: the same shards
    for i in (0, 4, 6, 7, 8, 9):  # names whose hashes fall above the held-out ones: none is held out now
        (corpus / f"added{i}.txt").write_text(f"An added document, number {i}, with words of its own.\n")
    now = ev.training_heldout(run)
    assert "training data changed since it was trained (10 documents then, 16 now)" in caplog.text
    assert _val_text(now) == _val_text(then) and now.meta["splits"]["val"]["documents"] == 1
    # on its own, the grown corpus holds out two documents: the one held out in training and one trained on
    from tinyllm.data import prepare

    fresh = prepare([corpus], val_fraction=0.1, progress=False)
    assert fresh.meta["splits"]["val"]["documents"] == 2
    assert _val_text(then) in _val_text(fresh) and "added" not in _val_text(fresh)


def test_scoring_the_training_folder_warns_that_it_is_not_held_out(run_on_a_folder, caplog):
    run, corpus, then = run_on_a_folder
    seen = ev.trained_on(run, [corpus])
    assert len(seen) == 9 and all(s.startswith("corpus/doc") for s in seen)
    assert not any(f"{s.split('/')[-1].removesuffix('.txt')} says" in _val_text(then) for s in seen)
    ev.measure_model("custom", str(run), data=[corpus], device="cpu", max_tokens=8)  # evaluate's and compare's
    assert "9 of the documents given are in" in caplog.text and "not a held-out score" in caplog.text
    caplog.clear()
    held = next(p for p in corpus.iterdir() if f"corpus/{p.name}" not in seen)
    ev.evaluate_model(str(run), data=[held], device="cpu", max_tokens=8)
    assert "not a held-out score" not in caplog.text


def test_a_run_whose_data_is_gone_says_so(run_on_a_folder):
    import shutil

    run, corpus, _ = run_on_a_folder
    shutil.rmtree(corpus)
    with pytest.raises(EvaluationError, match=r"the data .* was trained on cannot be read now .* pass --data"):
        ev.training_heldout(run)
