"""How good is a model: bits per byte on held-out text, repetition in its samples, and GPT-2 side by side.

Bits per byte is the loss in bits summed over every scored token, divided by the UTF-8 bytes of the text
those tokens spell. Unlike perplexity it does not depend on the tokenizer, so models compare on the same
bytes. Text longer than a context window is scored with a sliding window (the Hugging Face "perplexity of
fixed-length models" method): windows of `context` tokens start every `stride` tokens, every token is scored
exactly once, and after the first window every token sees at least `context - stride + 1` tokens before it.

A held-out stream starts with the end-of-text token, as every later document in it already does, so the
first token of the text is scored too and the bytes of every token are counted once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tinyllm.corpus import CorpusError
from tinyllm.data import PreparedData
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT
from tinyllm.sampling import SamplingError, SamplingParams
from tinyllm.tokenizer import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)

# The fixed prompt set of `compare` and the quality benchmark (benchmarks/prompts.txt holds the same lines).
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The future of AI is",
    "To be, or not to be,",
    "Once upon a time",
    "My lord, the king",
    "ROMEO:",
    "What light through yonder window",
    "The quick brown fox",
    "In the beginning",
)
DEFAULT_SEEDS: tuple[int, ...] = (1337,)


class EvaluationError(TinyLLMError):
    """The text or the settings cannot be evaluated (empty text, context past the model's, ...)."""


# --- bits per byte -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """The loss of a model on a token stream, per token and per byte of the text behind it."""

    loss_nats_per_token: float
    perplexity: float
    bits_per_byte: float
    tokens_scored: int
    bytes: int
    context: int
    stride: int
    method: str
    total_nats: float = field(default=0.0, repr=False)
    text: str = ""  # what was evaluated, e.g. "val split of shakespeare"
    ends_scored: int = 0  # end-of-text tokens among the scored ones (document ends predicted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(num_tokens: int, *, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score tokens 1..num_tokens-1 once each, as (start, length, scored) triples.

    A window feeds tokens [start, start + length) and predicts tokens [start + 1, start + length]; only its
    last `scored` predictions count (all of them in the first window, at most `stride` later on).
    """
    windows = []
    scored_to = 0  # the last target position already scored
    start = 0
    while scored_to < num_tokens - 1:
        end = min(start + context, num_tokens - 1)  # the last target position of this window
        windows.append((start, end - start, end - scored_to))
        scored_to = end
        start += stride
    return windows


def _scored_logits(model: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """Logits (B, n, V) of the last n positions of x (B, T); a GPT runs its head on those positions only."""
    if isinstance(model, GPT):
        return model.lm_head(model.hidden_states(x)[:, -n:])  # (B, n, V)
    return model(x)[:, -n:]


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def evaluate_tokens(
    model: nn.Module,
    tokens: np.ndarray | torch.Tensor,
    *,
    num_bytes: int | Callable[[np.ndarray], int],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score tokens 1..N-1 of a stream with sliding windows and return the loss and bits per byte.

    Args:
        model: maps token ids (B, T) to logits (B, T, V); a `GPT` computes its head on scored positions only.
        tokens: the stream (N,), the first token serving as context only.
        num_bytes: UTF-8 bytes of the text the scored tokens spell, or a function of the evaluated stream
            (after `max_tokens`) that counts them.
        context: tokens per window (default: the model's block_size).
        stride: tokens between window starts (default: context // 2).
        batch_size: windows per forward pass.
        device: where the windows go (default: the model's device).
        max_tokens: score only the first `max_tokens` tokens after the first one.
        progress: show a progress bar.
    """
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if max_tokens is not None:
        if max_tokens < 1:
            raise EvaluationError(f"max_tokens must be >= 1, got {max_tokens}")
        arr = arr[: max_tokens + 1]
    if arr.ndim != 1 or len(arr) < 2:
        raise EvaluationError(f"need a 1-D stream of at least 2 tokens to score, got shape {arr.shape}")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    context = block_size if context is None else context
    if context is None or context < 1:
        raise EvaluationError("context must be a positive number of tokens (the model has no block_size)")
    if block_size is not None and context > block_size:
        raise EvaluationError(f"context {context} is longer than the model's block_size {block_size}")
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= stride <= context:
        raise EvaluationError(f"stride must be in [1, context={context}], got {stride}")
    nbytes = int(num_bytes(arr) if callable(num_bytes) else num_bytes)
    if nbytes <= 0:
        raise EvaluationError(f"the text has {nbytes} bytes; bits per byte needs some text")
    device = torch.device(device) if device is not None else _model_device(model)

    windows = sliding_windows(len(arr), context=context, stride=stride)
    # Consecutive windows of equal (length, scored) share a forward pass: all but the first and the tail.
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and groups[-1][0][1:] == w[1:] and len(groups[-1]) < batch_size:
            groups[-1].append(w)
        else:
            groups.append([w])
    was_training = model.training
    model.eval()
    total_nats = 0.0
    try:
        with tqdm(total=len(windows), desc="evaluating", unit="win", disable=not progress or None) as bar:
            for group in groups:
                _, length, n = group[0]
                rows = np.stack([arr[s : s + length + 1] for s, _, _ in group]).astype(np.int64)  # (B, L+1)
                batch = torch.from_numpy(rows).to(device)
                x, y = batch[:, :-1], batch[:, -n:]  # (B, L), (B, n)
                logits = _scored_logits(model, x, n).float()  # (B, n, V)
                total_nats += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                bar.update(len(group))
    finally:
        model.train(was_training)
    scored = len(arr) - 1
    loss = total_nats / scored
    return EvalResult(
        loss_nats_per_token=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=total_nats / math.log(2) / nbytes,
        tokens_scored=scored,
        bytes=nbytes,
        context=context,
        stride=stride,
        method=(
            f"sliding window (context {context}, stride {stride}): each token scored once; after the first "
            f"window every token has at least {context - stride + 1} tokens of context"
        ),
        total_nats=total_nats,
    )


def text_bytes(tokens: Iterable[int], *, tokenizer: Tokenizer) -> int:
    """UTF-8 bytes spelled by `tokens`, not counting end-of-text tokens (exact even mid-character)."""
    eot = tokenizer.eot_token
    return sum(len(tokenizer.token_bytes(int(t))) for t in tokens if int(t) != eot)


def held_out_stream(
    data: PreparedData | Sequence[str | Path] | None, *, split: str = "val", tokenizer: Tokenizer
) -> tuple[np.ndarray, int, str]:
    """The token stream to evaluate (led by end-of-text), its text's UTF-8 bytes, and a description.

    `data` is a prepared corpus (its `split`), text files / folders / globs (all of their text), a prepared
    data directory, or None for the built-in corpus's held-out split.
    """
    from tinyllm.corpus import iter_documents, resolve_sources
    from tinyllm.data import prepare

    eot = tokenizer.eot_token
    if data is None:
        data = prepare(None, progress=False)
    if not isinstance(data, PreparedData):
        paths = [Path(p) for p in data]
        if len(paths) == 1 and (paths[0] / "meta.json").is_file():
            data = PreparedData.load(paths[0])
    if isinstance(data, PreparedData):
        stream = np.asarray(data.tokens(split))
        if len(stream) == 0:
            raise EvaluationError(f"the {split} split of {data.dir} is empty; prepare with a larger --val-fraction")
        what = f"{split} split of {', '.join(data.meta.get('sources', []))}"
        if data.meta.get("tokenizer", tokenizer.name) != tokenizer.name:  # the same text in the model's tokens
            return _retokenize(stream, get_tokenizer(data.meta["tokenizer"]), tokenizer), data.num_bytes(split), what
        tokens = np.concatenate([np.array([eot], dtype=stream.dtype), stream])
        return tokens, data.num_bytes(split), what
    ids, nbytes, names = [eot], 0, []
    for source in resolve_sources([str(p) for p in data]):
        names.append(source.doc_id)
        for doc in iter_documents(source):
            ids += tokenizer.encode(doc.text) + [eot]
            nbytes += len(doc.text.encode("utf-8"))
    more = f" and {len(names) - 3} more files" if len(names) > 4 else ""
    return np.asarray(ids, dtype=np.int64), nbytes, ", ".join(names[:3] if more else names) + more


def _retokenize(stream: np.ndarray, source: Tokenizer, target: Tokenizer) -> np.ndarray:
    """A stream of `source` tokens (documents each ending in end-of-text) as `target` tokens, led by end-of-text."""
    ends = np.flatnonzero(stream == source.eot_token)
    ids = [np.array([target.eot_token], dtype=np.int64)]
    start = 0
    for end in [*ends.tolist(), len(stream)]:
        if end > start:
            text = source.encoding.decode_bytes(stream[start:end].tolist()).decode("utf-8", errors="replace")
            ids.append(np.asarray(target.encode_to_numpy(text), dtype=np.int64))
        if end < len(stream):
            ids.append(np.array([target.eot_token], dtype=np.int64))
        start = end + 1
    return np.concatenate(ids)


def _training_meta(spec: str | Path | None) -> dict[str, Any]:
    """A tinyllm checkpoint's metadata ({} for anything else: GPT-2, a module, no spec, an unreadable one)."""
    from tinyllm.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(spec) if spec is not None and Path(spec).is_dir() else None
    if checkpoint is None:
        return {}
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("train_config") or {}, dict):
        logger.warning("%s: no readable training config; evaluating on the built-in corpus", checkpoint)
        return {}
    return meta


def training_heldout(spec: str | Path | None) -> PreparedData:
    """The held-out split a checkpoint was validated on (its training data and val_fraction, from its
    metadata), or the built-in corpus's held-out split for anything else (GPT-2, a module, no spec).

    Documents added to the run's data since are split as `prepare` splits them now, which can move a document
    the model trained on into the held-out split; the documents held out in training (which the checkpoint
    records) are scored instead, with a warning.
    """
    from tinyllm.data import prepare

    meta = _training_meta(spec)
    config = meta.get("train_config") or {}
    sources, val_fraction = config.get("data") or None, config.get("val_fraction", 0.1)
    try:
        data = prepare(sources, val_fraction=val_fraction, progress=False)
    except CorpusError as exc:
        raise EvaluationError(
            f"the data {spec} was trained on cannot be read now ({exc}); pass --data with held-out text"
        ) from None
    then = meta.get("data_split") or {}
    if then.get("val_threshold") is None or data.meta.get("val_threshold") == then["val_threshold"]:
        return data
    if then.get("documents") == 1:  # held out by position inside its one document: not reproducible by document
        logger.warning(
            "%s was trained on one document (its end held out); its data now has %d documents, whose held-out "
            "split may hold text it trained on: pass --data with text it has not seen",
            spec, data.meta.get("documents", 0),
        )  # fmt: skip
        return data
    logger.warning(
        "%s's training data changed since it was trained (%s documents then, %d now): scoring the documents it "
        "held out then, not the split the data would get now (which holds documents it trained on)",
        spec, then.get("documents", "?"), data.meta.get("documents", 0),
    )  # fmt: skip
    return prepare(sources, val_fraction=val_fraction, progress=False, val_threshold=int(then["val_threshold"]))


def trained_on(spec: str | Path | None, data: Sequence[str | Path]) -> list[str]:
    """The documents among `data` (files, folders, globs) that a checkpoint trained on: those of its training
    data that its split did not hold out. Empty for anything but a tinyllm checkpoint that recorded its split."""
    from tinyllm.corpus import doc_hash, iter_document_ids, resolve_sources

    meta = _training_meta(spec)
    config, split = meta.get("train_config") or {}, meta.get("data_split") or {}
    if not config.get("data") or split.get("val_threshold") is None:
        return []
    try:
        training = {f.path.resolve(): f for f in resolve_sources(config["data"])}
    except TinyLLMError:  # the run's data is gone: nothing to compare with
        return []
    seen = []
    for given in resolve_sources([str(p) for p in data]):
        source = training.get(given.path.resolve())
        if source is None:
            continue
        for doc_id in iter_document_ids(source):
            if split.get("documents") == 1 or doc_hash(doc_id, int(split["seed"])) > int(split["val_threshold"]):
                seen.append(doc_id)
    return seen


def _warn_if_trained_on(spec: str, data: Sequence[str | Path]) -> None:
    paths = [Path(p) for p in data]
    if len(paths) == 1 and (paths[0] / "meta.json").is_file():  # a prepared directory: its split, its seed
        prepared, meta = PreparedData.load(paths[0]).meta, _training_meta(spec)
        then, ours = meta.get("data_split") or {}, set(meta.get("data_sources") or [])
        if then and ours & set(prepared.get("sources", [])) and (
            prepared.get("seed"), prepared.get("val_threshold")) != (then.get("seed"), then.get("val_threshold")
        ):  # fmt: skip
            logger.warning(
                "%s was split otherwise than %s's training data (seed %s, not %s, or other documents): its held-out "
                "split may hold documents the model trained on",
                paths[0], spec, prepared.get("seed"), then.get("seed"),
            )  # fmt: skip
        return
    seen = trained_on(spec, data)
    if seen:
        logger.warning(
            "%d of the documents given are in %s's training data and were not held out (%s%s): unless added "
            "since, it trained on them, so this is not a held-out score; leave out --data to score what it held out",
            len(seen), spec, ", ".join(seen[:3]), ", ..." if len(seen) > 3 else "",
        )  # fmt: skip


def evaluate_model(
    model: str | nn.Module,
    *,
    data: PreparedData | Sequence[str | Path] | None = None,
    split: str = "val",
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    max_tokens: int | None = None,
    max_bytes: int | None = None,
    max_ends: int | None = None,
    progress: bool = False,
    tokenizer: Tokenizer | None = None,
) -> EvalResult:
    """Bits per byte of a model (a spec for `resolve_model`, or a module) on held-out text.

    See `held_out_stream` for `data` (None: `training_heldout(model)`); `max_tokens` scores only a prefix,
    whose bytes are counted from its tokens; `max_bytes` the longest prefix of whole tokens spelling at most
    that many bytes (the same text for models with different tokenizers, to within a token), with at most
    `max_ends` document ends (another model's `ends_scored`: the end-of-text predictions it was charged for).
    `tokenizer` is a module's (default GPT-2's); a spec brings its own.
    """
    if data is None:
        data = training_heldout(model if isinstance(model, str) else None)
    elif isinstance(model, str) and not isinstance(data, PreparedData):
        _warn_if_trained_on(model, data)
    tokenizer = tokenizer or get_tokenizer()
    if isinstance(model, str):
        from tinyllm.checkpoint import resolve_model, tokenizer_from_meta

        model, meta = resolve_model(model, device=device)
        tokenizer = tokenizer_from_meta(meta, model)
    tokens, nbytes, what = held_out_stream(data, split=split, tokenizer=tokenizer)
    if max_bytes is not None:
        lengths = np.array(
            [len(tokenizer.token_bytes(int(t))) if int(t) != tokenizer.eot_token else 0 for t in tokens[1:]]
        )
        # the tokens whose bytes end at or before max_bytes, with as many document ends (zero-byte end-of-text
        # tokens) as the model whose prefix set max_bytes was charged for: the same predictions, byte for byte
        fits = int(np.searchsorted(np.cumsum(lengths), max_bytes, side="right"))
        if max_ends is not None:
            ends_at = np.flatnonzero(tokens[1 : fits + 1] == tokenizer.eot_token)
            fits = int(ends_at[max_ends]) if len(ends_at) > max_ends else fits
        max_tokens = max(1, fits) if max_tokens is None else min(max_tokens, max(1, fits))
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise EvaluationError(f"the text has token id {int(tokens.max())}, past the model's vocabulary of {vocab}")
    counted: int | Callable[[np.ndarray], int] = nbytes
    if max_tokens is not None and max_tokens + 1 < len(tokens):
        counted = lambda prefix: text_bytes(prefix[1:], tokenizer=tokenizer)  # noqa: E731
    scored = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    logger.info("evaluating on %s (%d of its %d tokens)", what, scored, len(tokens) - 1)
    result = evaluate_tokens(
        model, tokens, num_bytes=counted, context=context, stride=stride, batch_size=batch_size,
        device=device, max_tokens=max_tokens, progress=progress,
    )  # fmt: skip
    ends = int(np.count_nonzero(tokens[1 : scored + 1] == tokenizer.eot_token))
    return dataclasses.replace(result, text=what, ends_scored=ends)


# --- repetition in generated text ----------------------------------------------------------------


def ngrams(seq: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """The n-grams of a sequence, in order (none when it is shorter than n)."""
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[Hashable]], *, n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over the sequences (Li et al. 2016); 0 when there are none."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_counts(seq: Sequence[Hashable], *, n: int = 4) -> tuple[int, int]:
    """(occurrences repeating an earlier n-gram of the same sequence, all n-gram occurrences)."""
    seen: set[tuple[Hashable, ...]] = set()
    repeats = 0
    grams = ngrams(seq, n)
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats, len(grams)


def repeated_ngram_share(seqs: Sequence[Sequence[Hashable]], *, n: int = 4) -> float:
    """Share of n-gram occurrences that repeat an earlier n-gram of their own sequence, pooled; 0 if none."""
    counts = [repeated_ngram_counts(s, n=n) for s in seqs]
    total = sum(c for _, c in counts)
    return sum(r for r, _ in counts) / total if total else 0.0


@dataclass(frozen=True)
class GenerationMetrics:
    """Diversity and repetition of continuations (prompts excluded), on token ids and on whitespace words."""

    samples: int
    mean_length_tokens: float
    distinct_1: float
    distinct_2: float
    repeated_4gram_share: float
    distinct_1_words: float
    distinct_2_words: float
    repeated_4gram_share_words: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generation_metrics(token_ids: Sequence[Sequence[int]], *, texts: Sequence[str] | None = None) -> GenerationMetrics:
    """Metrics of continuations given as token ids (and their texts for the word-level variants)."""
    words = [t.split() for t in texts] if texts is not None else [[] for _ in token_ids]
    return GenerationMetrics(
        samples=len(token_ids),
        mean_length_tokens=sum(map(len, token_ids)) / len(token_ids) if token_ids else 0.0,
        distinct_1=distinct_n(token_ids, n=1),
        distinct_2=distinct_n(token_ids, n=2),
        repeated_4gram_share=repeated_ngram_share(token_ids, n=4),
        distinct_1_words=distinct_n(words, n=1),
        distinct_2_words=distinct_n(words, n=2),
        repeated_4gram_share_words=repeated_ngram_share(words, n=4),
    )


# --- samples and the side-by-side comparison -----------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One continuation of one prompt under one seed (`token_ids` without a final end-of-text)."""

    prompt: str
    seed: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str = "length"


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{path}: cannot read prompts ({exc})") from None
    prompts = [line for line in lines if line.strip() and not line.startswith("#")]
    if not prompts:
        raise EvaluationError(f"{path}: no prompts; write one prompt per line")
    return prompts


def generate_samples(
    model: nn.Module,
    prompts: Sequence[str],
    *,
    params: SamplingParams | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    tokenizer: Tokenizer | None = None,
) -> list[Sample]:
    """Continue every prompt once per seed with the engine (default sampling settings unless `params`).

    All prompts of one seed run as one batch; each request has its own generator seeded with that seed.
    """
    from tinyllm.engine import generate

    tokenizer = tokenizer or get_tokenizer()
    params = params or SamplingParams()
    eot = tokenizer.eot_token
    encoded = [tokenizer.encode(p) or [eot] for p in prompts]
    samples = []
    for seed in seeds:
        results = generate(
            model, encoded, params.replace(seed=seed), eos_token_id=eot, tokenizer=tokenizer, truncate=True
        )
        for prompt, res in zip(prompts, results, strict=True):
            ids = list(res.token_ids)
            if ids and ids[-1] == eot and res.finish_reason == "stop":
                ids.pop()
            text = res.text if res.text is not None else tokenizer.decode(ids)
            samples.append(Sample(prompt, seed, text, tuple(ids), str(res.finish_reason)))
    return samples


@dataclass
class ModelResults:
    """Everything measured about one model: bits per byte, samples and their metrics, or why it is missing."""

    name: str
    source: str = ""
    eval: EvalResult | None = None
    samples: list[Sample] = field(default_factory=list)
    metrics: GenerationMetrics | None = None
    unavailable: str | None = None
    samples_unavailable: str | None = None  # why there are no samples (the model's logits were not finite)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "eval": self.eval.to_dict() if self.eval else None,
            "metrics": self.metrics.to_dict() if self.metrics else None,
            "samples": [asdict(s) for s in self.samples],
            "unavailable": self.unavailable,
            "samples_unavailable": self.samples_unavailable,
        }


def measure_model(
    name: str,
    spec: str | nn.Module,
    *,
    gpt2: bool = False,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    data: PreparedData | Sequence[str | Path] | None = None,
    params: SamplingParams | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    context: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    max_bytes: int | None = None,
    max_ends: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    skip_eval: bool = False,
    progress: bool = False,
    tokenizer: Tokenizer | None = None,
) -> ModelResults:
    """Load a model, score the held-out text and sample the prompts.

    Args:
        name: the model's label in tables and plots.
        spec: a module, or a spec for `resolve_model`; with `gpt2=True`, a GPT-2 source for `load_gpt2`
            ("gpt2" / "gpt2-medium" / ..., a hub id, or a local Hugging Face directory).
        gpt2: load pretrained GPT-2; when its weights cannot be loaded the result says why in `unavailable`
            instead of raising.
        prompts, params, seeds: the samples (no prompts: no samples); see `generate_samples`.
        data, context, stride, max_tokens, max_bytes, max_ends, batch_size: the held-out evaluation; see
            `evaluate_model`
            (data None: the split a checkpoint was validated on, else the built-in corpus's).
        device: where the model runs.
        skip_eval: sample only.
        progress: show a progress bar while scoring.
        tokenizer: a module's tokenizer (default GPT-2's); a checkpoint spec brings its own.
    """
    from tinyllm.checkpoint import GPT2_NAMES, check_tokenizer_fits, resolve_model, tokenizer_from_meta
    from tinyllm.gpt2 import load_gpt2
    from tinyllm.tokenizer import gpt2_source_tokenizer

    source = spec if isinstance(spec, str) else type(spec).__name__
    if isinstance(spec, nn.Module):
        model = spec
    elif gpt2:
        source = f"openai-community/{spec}" if spec in GPT2_NAMES else spec
        try:
            model = load_gpt2(source, device=device)
            tokenizer = tokenizer or gpt2_source_tokenizer(source)  # a local directory's own vocabulary
            check_tokenizer_fits(model, tokenizer, source)
        except TinyLLMError as exc:  # unavailable (offline, no cache) or unreadable: report it, never crash
            logger.warning("GPT-2 unavailable: %s", exc)
            return ModelResults(name=name, source=source, unavailable=str(exc))
    else:
        model, meta = resolve_model(spec, device=device)
        source = str(meta.get("source", source))
        tokenizer = tokenizer_from_meta(meta, model)
    tokenizer = tokenizer or get_tokenizer()
    result = ModelResults(name=name, source=source)
    if data is None and not skip_eval:
        data = training_heldout(spec if isinstance(spec, str) and not gpt2 else None)
    elif not skip_eval and isinstance(spec, str) and not gpt2 and not isinstance(data, PreparedData):
        _warn_if_trained_on(spec, data)
    if not skip_eval:
        result.eval = evaluate_model(
            model, data=data, context=context, stride=stride, max_tokens=max_tokens, max_bytes=max_bytes,
            max_ends=max_ends,
            batch_size=batch_size, device=device, progress=progress, tokenizer=tokenizer,
        )  # fmt: skip
    if prompts:
        try:
            result.samples = generate_samples(model, prompts, params=params, seeds=seeds, tokenizer=tokenizer)
        except SamplingError as exc:  # e.g. NaN weights: the scores above (NaN too) still get reported
            logger.warning("%s: no samples (%s)", name, exc)
            result.samples_unavailable = str(exc)
            return result
        result.metrics = generation_metrics(
            [s.token_ids for s in result.samples], texts=[s.text for s in result.samples]
        )
    return result


def compare_models(
    *,
    custom: str | nn.Module | None,
    gpt2: str | None = "gpt2",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    data: PreparedData | Sequence[str | Path] | None = None,
    **options: Any,
) -> list[ModelResults]:
    """The custom model and pretrained GPT-2 on the same prompts, seeds and held-out bytes.

    `options` go to `measure_model` (params, seeds, context, stride, max_tokens, batch_size, device, ...).
    GPT-2 comes back `unavailable` with its reason when its weights cannot be loaded.
    """
    if data is None:  # the custom model's held-out split, prepared once so both models read the same bytes
        data = training_heldout(custom if isinstance(custom, str) else None)
    results = []
    if custom is not None:
        results.append(measure_model("custom", custom, prompts=prompts, data=data, **options))
        scored = results[0].eval
        if options.get("max_tokens") is not None and scored is not None:
            # GPT-2's tokens split the text elsewhere: score the bytes the custom model's first max_tokens spell
            options = {**options, "max_tokens": None, "max_bytes": scored.bytes, "max_ends": scored.ends_scored}
    if gpt2 is not None:
        results.append(measure_model("GPT-2", gpt2, gpt2=True, prompts=prompts, data=data, **options))
    return results
