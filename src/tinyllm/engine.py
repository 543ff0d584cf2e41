"""The inference engine: prefill and decode over token ids on a static KV cache, with continuous batching.

An `Engine` owns a model and one `KVCache` of N slots. `submit` queues a request; each `step()` admits
waiting requests into free slots (prefilling each into its slot), runs one batched decode step for every
active slot (each at its own position), emits per-request events and retires the finished. `generate` and
`stream` are thin loops over an Engine; `generate_naive` re-runs the whole context every token and is the
oracle the tests hold the engine to. `compile=True` (or `compile_decode()`) builds a faster step for decoding a
lone sequence: the fp32 step written in C (`tinyllm.fused_decode`), else the one `torch.compile` builds
(`tinyllm.compiled_decode`, which also runs bf16 and int8); the other steps stay eager. A lone greedy sequence on
the C step decodes a burst of up to `Engine.burst_s` (several tokens) per call, settled afterwards one by one
(multi-step scheduling); a new request, a cancel or a stop ends a burst after its current token.

Threading: one thread (a server's worker) owns the Engine and loops `step()` or `run()`; any thread may
`submit`, `cancel` and consume a request's events (a `queue.Queue` per request, or a callback).

Text is an adapter: with a tokenizer (or a `decode` callable) each request turns its ids into UTF-8-safe
text deltas, stops on stop strings that may span tokens, and holds back text that could begin one.

Shapes: B active rows, T tokens, C channels, V vocabulary.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import nn

from tinyllm import compiled_decode, fused_decode
from tinyllm.errors import TinyLLMError
from tinyllm.kv_cache import KVCache
from tinyllm.quantize import huge_page_zeros_like_all, pack_for_batches, prepare_for_inference
from tinyllm.sampling import SamplingError, SamplingParams, make_generator, sample, token_logprobs

if TYPE_CHECKING:
    from tinyllm.compiled_decode import CompiledDecoder
    from tinyllm.fused_decode import FusedDecoder
    from tinyllm.model import GPT

__all__ = [
    "Engine",
    "Event",
    "GenerationResult",
    "PromptTooLongError",
    "QueueFullError",
    "InvalidPromptError",
    "Request",
    "RequestHandle",
    "TokenLogprob",
    "generate",
    "generate_naive",
    "prepare_for_inference",
    "stream",
]

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
DecodeStep = Literal["c", "inductor"]
DECODE_STEPS: tuple[DecodeStep, ...] = ("c", "inductor")


class PromptTooLongError(TinyLLMError):
    """The prompt leaves no room to generate within the model's context."""


class InvalidPromptError(TinyLLMError):
    """The prompt is empty or holds ids outside the vocabulary."""


class QueueFullError(TinyLLMError):
    """The engine's waiting queue is full; retry later."""


# --- requests, events, results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One generation request over token ids.

    Attributes:
        prompt: the prompt's token ids (at least one).
        params: sampling and stopping parameters.
        request_id: a caller's id; one is made up when None.
        truncate: when the prompt is too long, drop tokens from its left instead of raising
            `PromptTooLongError` (keeping room for min(max_new_tokens, context / 2) new tokens).
    """

    prompt: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    truncate: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the likeliest alternatives at its position (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """A finished request.

    `token_ids` holds every generated id, including an EOS or stop id that ended generation and the tokens
    that completed a stop string; `text` (when a tokenizer or `decode` was given) leaves out the EOS / stop
    id's text and is cut before the stop string.
    """

    request_id: str
    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    prompt_truncated: int = 0  # prompt tokens dropped from the left
    time_to_first_token_s: float | None = None
    elapsed_s: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: new token ids, new text, and on the last event the result."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """The caller's side of a submitted request: a stream of `Event`s ending with one that is `finished`.

    Events go to a thread-safe queue (or to the `on_event` callback given to `submit`, called on the engine's
    thread with the engine's lock held: it must not block, e.g. `loop.call_soon_threadsafe`). With the queue,
    iterate the handle (blocking) or call `result()`.
    """

    def __init__(self, request_id: str, *, on_event: Callable[[Event], None] | None = None) -> None:
        self.request_id = request_id
        self._queue: queue.Queue[Event] = queue.Queue()
        self._on_event = on_event
        self._result: GenerationResult | None = None
        self._done = threading.Event()

    def _emit(self, event: Event) -> None:
        if event.result is not None:
            self._result = event.result
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._queue.put(event)
        if event.result is not None:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def events(self, *, timeout: float | None = None) -> Iterator[Event]:
        """Events as they arrive until the finished one (raises `queue.Empty` after `timeout` seconds idle)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.finished:
                return

    __iter__ = events

    def token_deltas(self, *, timeout: float | None = None) -> Iterator[list[int]]:
        """The new token ids of each event."""
        for event in self.events(timeout=timeout):
            if event.token_ids:
                yield list(event.token_ids)

    def text_deltas(self, *, timeout: float | None = None) -> Iterator[str]:
        """The new text of each event (never a partial UTF-8 character, never part of a stop string)."""
        for event in self.events(timeout=timeout):
            if event.text:
                yield event.text

    def result(self, *, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish and return its result."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        assert self._result is not None
        return self._result


# --- text: UTF-8-safe deltas and stop strings -------------------------------------------------------------------------


class IncrementalTextDecoder(Protocol):
    """Token ids in, text out, never a partial UTF-8 character (tinyllm.tokenizer.IncrementalDecoder)."""

    def add(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


class TextCodec(Protocol):
    """What the engine needs of a tokenizer (tinyllm.tokenizer.Tokenizer has it)."""

    def incremental_decoder(self) -> IncrementalTextDecoder: ...


class _RedecodeDecoder:
    """Incremental text from a plain `decode(ids) -> str`: re-decode a short window, hold back a trailing U+FFFD.

    The same offsets trick as vLLM's detokenizer: text is only emitted once it no longer ends in a
    replacement character (a UTF-8 character still missing bytes).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are emitted

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._decode(self._ids[self._prefix : self._read])
        new = self._decode(self._ids[self._prefix :])
        if len(new) > len(done) and not new.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new[len(done) :]
        return ""

    def flush(self) -> str:
        done = self._decode(self._ids[self._prefix : self._read])
        new = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new[len(done) :]


class _DecodeCodec:
    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode

    def incremental_decoder(self) -> IncrementalTextDecoder:
        return _RedecodeDecoder(self._decode)


class _TextStream:
    """One request's text: appends decoded pieces, finds stop strings, holds back a possible stop prefix."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...]) -> None:
        self._decoder = codec.incremental_decoder()
        self._stop = stop
        self.text = ""
        self._emitted = 0

    @property
    def emitted(self) -> str:
        return self.text[: self._emitted]

    def _find_stop(self) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self.text.find(s, self._emitted)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _holdback(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text) - self._emitted), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _advance(self, *, final: bool) -> tuple[str, str | None]:
        match = self._find_stop()
        if match is not None:
            self.text = self.text[: match[0]]
        end = len(self.text) if final or match is not None else len(self.text) - self._holdback()
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta, match[1] if match is not None else None

    def add(self, token_id: int) -> tuple[str, str | None]:
        """Feed a token: (text now safe to emit, the stop string if one matched)."""
        self.text += self._decoder.add(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """End of stream: flush the decoder and release held-back text (unless it completes a stop string)."""
        self.text += self._decoder.flush()
        return self._advance(final=True)[0]


# --- per-request state ----------------------------------------------------------------------------------------------


class _Sequence:
    """A request in flight: its ids, generator, text stream and where it sits."""

    def __init__(
        self, request: Request, request_id: str, prompt: list[int], dropped: int, handle: RequestHandle
    ) -> None:
        self.request = request
        self.params = request.params
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_truncated = dropped
        self.handle = handle
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.generator: torch.Generator | None = None
        self.text: _TextStream | None = None
        self.slot: int | None = None
        self.finished = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


# --- the engine -----------------------------------------------------------------------------------------------------


# A lone greedy sequence on the C step decodes up to this many tokens per call (`Engine.burst_s`).
MAX_BURST = 16
BURST_S = 0.08


class Engine:
    """Continuous batching over `max_batch_size` slots of one preallocated KV cache.

    Args:
        model: a GPT (ideally after `prepare_for_inference`).
        max_batch_size: number of slots, i.e. sequences decoded together.
        max_queue: most requests waiting while every slot is busy; more raise `QueueFullError`.
        max_seq_len: positions per slot (default and cap: the model's block_size); the context limit.
        eos_token_id: the end-of-text id (None: no EOS).
        tokenizer: something with `incremental_decoder()` (tinyllm's Tokenizer) for text and stop strings.
        decode: alternatively a plain `decode(ids) -> str`.
        compile: build the batch-1 decode step now (`compile_decode`; CPU only): steps that decode a single
            sequence then run it, the others stay eager. True picks the fastest step that runs this model
            ("c", else "inductor"); "c" or "inductor" asks for one.

    `burst_s` (attribute): how long a lone greedy sequence on the C step may decode in one call (several tokens,
    settled afterwards one by one); 0 decodes one token a call.
    """

    burst_s: float = BURST_S

    def __init__(
        self,
        model: GPT,
        *,
        max_batch_size: int = 8,
        max_queue: int = 256,
        max_seq_len: int | None = None,
        eos_token_id: int | None = None,
        tokenizer: TextCodec | None = None,
        decode: Callable[[list[int]], str] | None = None,
        compile: bool | DecodeStep = False,
    ) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue >= 0")
        self.model = model
        self.config = model.config
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context_limit = min(self.config.block_size, max_seq_len or self.config.block_size)
        self.eos_token_id = eos_token_id
        self._codec: TextCodec | None = (
            tokenizer if tokenizer is not None else (_DecodeCodec(decode) if decode else None)
        )
        weight = model.transformer.wte.weight
        self.device = weight.device
        self.cache = KVCache.for_model(
            self.config,
            batch_size=max_batch_size,
            max_seq_len=self.context_limit,
            device=self.device,
            dtype=weight.dtype,
        )
        # 2 MB pages, one mapping for all layers: faster reads (attention's at batch 1 are latency-bound)
        arena = huge_page_zeros_like_all([t for pair in zip(self.cache.k, self.cache.v, strict=True) for t in pair])
        self.cache.k, self.cache.v = arena[0::2], arena[1::2]
        if weight.dtype == torch.float32 and fused_decode.unavailable(self.device) is None:
            try:  # decoding steps' attention in C (each row over its own positions)
                self.cache.decode_attention = fused_decode.DecodeAttention()
            except (RuntimeError, OSError) as exc:
                logger.warning("decoding steps use torch's attention: %s", exc)
        if max_batch_size > 1:
            pack_for_batches(model, max_batch_size)  # a weight copy for batched steps (C panels, else oneDNN blocked)
        self._slots: list[_Sequence | None] = [None] * max_batch_size
        self._waiting: deque[_Sequence] = deque()
        self._lock = threading.RLock()  # re-entrant: an `on_event` callback may submit or cancel
        self._wakeup = threading.Condition(self._lock)
        self._ids = itertools.count()
        self.steps = 0
        self.tokens_generated = 0
        self._compiled: FusedDecoder | CompiledDecoder | None = None  # set once built and warmed up
        self._slot_caches: dict[int, KVCache] = {}  # one-slot views of the cache, for the compiled step
        self._c_logits: torch.Tensor | None = None  # the C step's logits, rewritten each step
        self._c_step_s: float | None = None  # the last C call's seconds per token (sizes the next burst)
        if compile:
            self.compile_decode(step="auto" if compile is True else compile)

    def compile_decode(self, *, background: bool = False, step: DecodeStep | Literal["auto"] = "auto") -> str | None:
        """Build the batch-1 decode step: `step` "c" (fp32 models, `tinyllm.fused_decode`), "inductor" (any
        float or int8-weight model, `tinyllm.compiled_decode`) or "auto" (the first of those that runs this
        model and builds). Until it is ready, and if it fails, decoding stays eager. Returns why none can be
        built here, or None. `background`: build on a daemon thread (a server keeps serving meanwhile)."""
        if step not in ("auto", *DECODE_STEPS):
            raise ValueError(f"step must be 'auto' or one of {', '.join(DECODE_STEPS)}, got {step!r}")
        candidates, reasons = [], []
        for name, module in (("c", fused_decode), ("inductor", compiled_decode)):
            if step in ("auto", name):
                reason = module.unavailable(self.device, self.model)
                (reasons if reason else candidates).append(reason or name)
        if not candidates:
            reason = "; ".join(reasons)
            logger.warning("decoding eagerly: %s", reason)
            return reason

        def build() -> None:
            for i, name in enumerate(candidates):
                try:
                    make = fused_decode.FusedDecoder if name == "c" else compiled_decode.CompiledDecoder
                    decoder = make(self.model)
                    decoder.warm_up(self.cache)
                except Exception as exc:  # a compiler or inductor failure must not take the engine down
                    then = f"trying {candidates[i + 1]}" if i + 1 < len(candidates) else "decoding eagerly"
                    logger.warning("%s: building the %s decode step failed: %s", then, name, exc)
                    continue
                self._compiled = decoder
                return

        if background:
            threading.Thread(target=build, name="tinyllm-compile-decode", daemon=True).start()
        else:
            build()
        return None

    @property
    def compiled(self) -> bool:
        """Whether single-sequence decode steps run a built step (C or inductor)."""
        return self._compiled is not None

    @property
    def decode_step(self) -> str:
        """Which step decodes a lone sequence: "c", "inductor" or "eager"."""
        return self._compiled.kind if self._compiled is not None else "eager"

    # -- metrics -------------------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot (the queue depth)."""
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        """Slots holding a request."""
        return sum(s is not None for s in self._slots)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_active > 0

    @property
    def kv_cache_bytes_per_sequence(self) -> int:
        return self.cache.nbytes // self.max_batch_size

    # -- submitting and cancelling -------------------------------------------------------------------------------

    def check_prompt(self, request: Request) -> tuple[list[int], int]:
        """The prompt `request` would run with (its left cut off to fit the context, if it allows truncation) and
        how many tokens were dropped. Raises PromptTooLongError or InvalidPromptError, as `submit` does."""
        prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise InvalidPromptError("the prompt is empty; give at least one token (e.g. the end-of-text id)")
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidPromptError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        limit = self.context_limit
        room = min(request.params.max_new_tokens, limit // 2)  # what a cut prompt leaves for the answer
        if request.truncate and len(prompt) + room > limit:
            # cut so the answer gets its room: a prompt a token short of the context would otherwise get one new
            # token where a longer one, cut, gets them all
            keep = limit - room
            return prompt[-keep:], len(prompt) - keep
        if len(prompt) <= limit - 1:
            return prompt, 0
        raise PromptTooLongError(
            f"the prompt has {len(prompt)} tokens but the context holds {limit} "
            f"(at most {limit - 1} prompt tokens leave room to generate); shorten it or allow truncation"
        )

    def submit(self, request: Request, *, on_event: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request; returns its handle. Raises PromptTooLongError, InvalidPromptError, QueueFullError."""
        prompt, dropped = self.check_prompt(request)
        if request.params.stop and self._codec is None:
            raise SamplingError("stop strings need text: create the engine with a tokenizer or a decode function")
        with self._lock:
            free = sum(s is None for s in self._slots)
            if len(self._waiting) - free >= self.max_queue:  # requests a free slot takes next step don't queue
                raise QueueFullError(f"the engine's queue is full ({self.max_queue} requests waiting); retry later")
            request_id = request.request_id or f"req-{next(self._ids)}"
            seq = _Sequence(request, request_id, prompt, dropped, RequestHandle(request_id, on_event=on_event))
            self._waiting.append(seq)
            self._wakeup.notify_all()
            if free:  # a running burst yields to a request that can take a slot now
                self._interrupt()
        return seq.handle

    def cancel(self, handle: RequestHandle | str) -> bool:
        """Stop a request now: its slot is free for the next step. Returns False if it had already finished."""

        def match(s: _Sequence | None) -> bool:
            return s is not None and (s.request_id == handle if isinstance(handle, str) else s.handle is handle)

        with self._lock:
            seq = next((s for s in self._waiting if match(s)), None)
            if seq is not None:
                self._waiting.remove(seq)
            else:
                seq = next((s for s in self._slots if match(s)), None)
                if seq is None or seq.finished:
                    return False
                self._slots[seq.slot] = None  # type: ignore[index]
            seq.finished = True
            self._finish(seq, "cancelled", delta_text="")
            self._interrupt()
        return True

    def cancel_all(self) -> None:
        with self._lock:
            ids = [s.request_id for s in self._waiting] + [s.request_id for s in self._slots if s is not None]
        for request_id in ids:
            self.cancel(request_id)

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, idle_wait_s: float = 0.1) -> None:
        """Loop `step()` until `stop` is set, sleeping while there is no work (for a worker thread)."""
        while not stop.is_set():
            with self._lock:
                if not self._waiting and all(s is None for s in self._slots):
                    self._wakeup.wait(idle_wait_s)
                    continue
            try:
                self.step()
            except Exception as exc:  # keep the worker alive; fail what was in flight
                logger.exception("engine step failed")
                self._fail_active(f"{type(exc).__name__}: {exc}")

    def wake(self) -> None:
        """Wake a `run()` loop (e.g. after setting its stop event)."""
        with self._lock:
            self._wakeup.notify_all()
            self._interrupt()

    def _interrupt(self) -> None:
        """End a running burst of the C step after its current token (a new request, a cancel, a stop). Set under
        the lock with the change it announces; the engine resets it under the lock before it looks at the queue
        and the sequence to size a burst, so every change is either seen then or ends the burst."""
        decoder = self._compiled
        if decoder is not None and decoder.kind == "c":
            decoder.interrupt()  # type: ignore[union-attr]

    def _fail_active(self, message: str) -> None:
        with self._lock:
            failed = [s for s in self._slots if s is not None]
            self._slots = [None] * self.max_batch_size
            for seq in failed:
                seq.finished = True
                self._finish(seq, "error", delta_text="", error=message)

    def step(self) -> list[Event]:
        """Admit waiting requests into free slots (prefill), decode one token for the others; returns the events."""
        events: list[Event] = []
        with self._lock:
            admitted: list[_Sequence] = []
            for slot in range(self.max_batch_size):
                if not self._waiting:
                    break
                if self._slots[slot] is None:
                    seq = self._waiting.popleft()
                    seq.slot = slot
                    self._slots[slot] = seq
                    admitted.append(seq)
        for group in _prefill_groups(admitted):
            with torch.inference_mode():
                events += self._prefill(group)
        with self._lock:
            # every occupied slot decodes, the just-prefilled too (a free row in range writes only to itself)
            decoding = [s for s in self._slots if s is not None]
        if decoding:
            events += self._decode(decoding)
        self.steps += 1
        return events

    def _prefill(self, seqs: list[_Sequence]) -> list[Event]:
        """Run the prompts of sequences in adjacent slots through the model together (right-padded to the longest:
        causal attention keeps the padding out of every real position, and a row's padding in the cache lies past
        its length, masked until its own tokens overwrite it), then draw each one's first token."""
        for seq in seqs:
            seq.generator = make_generator(seq.params.seed, device=self.device)
            if self._codec is not None:
                seq.text = _TextStream(self._codec, seq.params.stop)
        first = seqs[0].slot
        assert first is not None
        lengths = [len(seq.prompt) for seq in seqs]
        width = max(lengths)
        rows = [seq.prompt + [0] * (width - len(seq.prompt)) for seq in seqs]
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)  # (B, T)
        pos = torch.arange(width, device=self.device)  # (T,)
        cache = self.cache.view(slice(first, first + len(seqs)))
        h = self.model.hidden_states(idx, input_pos=pos, kv_cache=cache)  # (B, T, C)
        last = torch.tensor(lengths, device=self.device) - 1  # (B,)
        logits = self.model.lm_head(h[torch.arange(len(seqs), device=self.device), last])  # (B, V): last positions
        return self._advance(seqs, logits)

    def _decode(self, seqs: list[_Sequence]) -> list[Event]:
        """One batched decode step over the slots 0..max(slot): each row fed its last token at its position."""
        if len(seqs) == 1 and self._compiled is not None:
            (seq,) = seqs
            slot = seq.slot
            assert slot is not None
            cache = self._slot_caches.get(slot)
            if cache is None:
                cache = self._slot_caches[slot] = self.cache.view(slice(slot, slot + 1))
            if self._compiled.kind == "c":
                # no torch op at all on this path (the C step writes its logits into a buffer kept here): after
                # the step has streamed every weight through the caches, each op and the inference-mode switch
                # would run cold (~80 us a step, measured)
                if self._c_logits is None:
                    self._c_logits = torch.empty(1, self.config.vocab_size, dtype=torch.float32, device=self.device)
                with self._lock:  # the flag is reset, then the queue and the sequence looked at (see `_interrupt`)
                    self._compiled.reset_interrupt()  # type: ignore[union-attr]
                    if seq.finished or self._slots[slot] is not seq:
                        return []  # cancelled since `step` listed it
                    count = self._burst_size(seq)
                start = time.perf_counter()
                if count > 1:
                    tokens = self._compiled.decode_many(  # type: ignore[union-attr]
                        seq.output[-1], cache, seq.length, count, stop_ids=self._stop_ids(seq), out=self._c_logits
                    )
                    self._c_step_s = (time.perf_counter() - start) / len(tokens)
                    return self._advance_burst(seq, tokens)
                logits, greedy = self._compiled.decode(seq.output[-1], cache, seq.length, out=self._c_logits)
                self._c_step_s = time.perf_counter() - start
                return self._advance(seqs, logits, greedy=greedy)
            with torch.inference_mode():
                logits, greedy = self._compiled.decode(seq.output[-1], cache, seq.length)  # (1, V), (1,)
                return self._advance(seqs, logits, greedy=greedy)
        with torch.inference_mode():
            return self._decode_batch(seqs)

    def _burst_size(self, seq: _Sequence) -> int:
        """How many tokens a lone sequence decodes in one call of the C step (the lock held): greedy rows without
        penalties or logprobs take up to `burst_s` of decoding at once (multi-step scheduling, as vLLM's) unless
        a waiting request could take a free slot; others one. The tokens are then settled one by one as if
        decoded apart (stop conditions, cancellation); a request that arrives meanwhile for a free slot, a cancel
        or a stop ends the burst after its current token (`_interrupt`). Stop strings are found only then: a
        greedy request with stop strings may decode up to a burst past its match (not returned)."""
        p = seq.params
        if (
            self.burst_s <= 0
            or self._c_step_s is None
            or p.temperature != 0
            or p.has_penalties
            or p.logprobs
            or (self._waiting and any(s is None for s in self._slots))
        ):
            return 1
        left = min(p.max_new_tokens - len(seq.output), self.context_limit - seq.length)
        return max(1, min(MAX_BURST, left, int(self.burst_s / max(self._c_step_s, 1e-6))))

    def _stop_ids(self, seq: _Sequence) -> tuple[int, ...]:
        """The token ids that end `seq` (EOS unless ignored, and its stop_token_ids)."""
        eos = () if self.eos_token_id is None or seq.params.ignore_eos else (self.eos_token_id,)
        return eos + seq.params.stop_token_ids

    def _advance_burst(self, seq: _Sequence, tokens: list[int]) -> list[Event]:
        """Settle the greedy tokens of one burst in order, as `_advance` settles one: the first that finishes the
        sequence (a stop string, max tokens) ends it, and a cancel from another thread drops the rest."""
        now = time.perf_counter()
        events: list[Event] = []
        with self._lock:
            for token in tokens:
                if seq.finished or self._slots[seq.slot] is not seq:  # type: ignore[index]
                    break  # finished by an earlier token of the burst, or cancelled while it ran
                seq.output.append(token)
                if seq.first_token_at is None:
                    seq.first_token_at = now
                self.tokens_generated += 1
                events.append(self._check_finish(seq, token, None))
        return events

    def _decode_batch(self, seqs: list[_Sequence]) -> list[Event]:
        n = max(s.slot for s in seqs) + 1  # type: ignore[type-var]
        tokens = [0] * n  # free slots in range decode a dummy token at position 0 (overwritten on reuse)
        positions = [0] * n
        for s in seqs:
            tokens[s.slot] = s.output[-1]  # type: ignore[index]
            positions[s.slot] = s.length - 1  # type: ignore[index]
        idx = torch.tensor(tokens, dtype=torch.long, device=self.device).view(n, 1)  # (B, 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device).view(n, 1)  # (B, 1)
        cache = self.cache if n == self.max_batch_size else self.cache.view(slice(0, n))
        h = self.model.hidden_states(idx, input_pos=pos, kv_cache=cache)  # (B, 1, C)
        logits = self.model.lm_head(h[:, -1])  # (B, V)
        if len(seqs) < n:
            logits = logits[[s.slot for s in seqs]]  # type: ignore[misc]
        return self._advance(seqs, logits)

    def _advance(
        self, seqs: list[_Sequence], logits: torch.Tensor, greedy: torch.Tensor | Sequence[int] | None = None
    ) -> list[Event]:
        """Draw a token per row of logits (B, V), check stop conditions, emit events. `greedy`: the rows' argmax
        (B,) when already computed (the compiled or C step's)."""
        params = [s.params for s in seqs]
        needs_history = any(p.has_penalties for p in params)
        failed: dict[int, str] = {}  # rows whose logits could not be sampled: they end, the others go on
        tokens = sample(
            logits,
            params,
            generators=[s.generator for s in seqs],
            output_ids=[s.output for s in seqs] if needs_history else None,
            prompt_ids=[s.prompt for s in seqs] if needs_history else None,
            argmax=greedy,
            errors=failed,
        )
        lp_rows = [i for i, p in enumerate(params) if p.logprobs]
        row_logprobs: dict[int, TokenLogprob] = {}
        if lp_rows:
            top_n = max(params[i].top_logprobs for i in lp_rows)
            sub = logits[lp_rows] if len(lp_rows) < len(seqs) else logits
            for i, (lp, top) in zip(
                lp_rows, token_logprobs(sub, [tokens[i] for i in lp_rows], top_n=top_n), strict=True
            ):
                row_logprobs[i] = TokenLogprob(tokens[i], lp, tuple(top[: params[i].top_logprobs]))
        now = time.perf_counter()
        events: list[Event] = []
        with self._lock:  # a cancel from another thread waits until these rows are settled
            for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
                if seq.finished or self._slots[seq.slot] is not seq:  # type: ignore[index]
                    continue  # cancelled while this step ran
                if i in failed:
                    logger.error("request %s failed: %s", seq.request_id, failed[i])
                    seq.finished = True
                    self._slots[seq.slot] = None  # type: ignore[index]
                    events.append(self._finish(seq, "error", delta_text="", error=f"SamplingError: {failed[i]}"))
                    continue
                seq.output.append(token)
                if seq.first_token_at is None:
                    seq.first_token_at = now
                logprob = row_logprobs.get(i)
                if logprob is not None:
                    seq.logprobs.append(logprob)
                self.tokens_generated += 1
                events.append(self._check_finish(seq, token, logprob))
        return events

    def _check_finish(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> Event:
        p = seq.params
        reason: FinishReason | None = None
        stop_reason: int | str | None = None
        is_stop_token = (token == self.eos_token_id and not p.ignore_eos) or token in p.stop_token_ids
        text = ""
        if is_stop_token:
            reason, stop_reason = "stop", token
        elif seq.text is not None:
            text, matched = seq.text.add(token)
            if matched is not None:
                reason, stop_reason = "stop", matched
        if reason is None and (len(seq.output) >= p.max_new_tokens or seq.length >= self.context_limit):
            reason = "length"
        lps = (logprob,) if logprob is not None else ()
        if reason is None:
            event = Event(seq.request_id, (token,), text, lps)
            seq.handle._emit(event)
            return event
        seq.finished = True
        if self._slots[seq.slot] is seq:  # type: ignore[index]
            self._slots[seq.slot] = None  # type: ignore[index]
        return self._finish(seq, reason, delta_text=text, token=token, logprob=logprob, stop_reason=stop_reason)

    def _finish(
        self,
        seq: _Sequence,
        reason: FinishReason,
        *,
        delta_text: str,
        token: int | None = None,
        logprob: TokenLogprob | None = None,
        stop_reason: int | str | None = None,
        error: str | None = None,
    ) -> Event:
        text: str | None = None
        if seq.text is not None:
            if reason == "cancelled" or reason == "error":
                text = seq.text.emitted  # what the caller has seen; held-back text is dropped
            else:
                if not isinstance(stop_reason, str):  # a stop string has already cut the text; else release the rest
                    delta_text += seq.text.finish()
                text = seq.text.text
        elif self._codec is not None:
            text = ""
        now = time.perf_counter()
        result = GenerationResult(
            request_id=seq.request_id,
            token_ids=list(seq.output),
            text=text,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
            logprobs=list(seq.logprobs) if seq.params.logprobs else None,
            stop_reason=stop_reason,
            prompt_truncated=seq.prompt_truncated,
            time_to_first_token_s=seq.first_token_at - seq.submitted if seq.first_token_at else None,
            elapsed_s=now - seq.submitted,
            error=error,
        )
        event = Event(
            seq.request_id,
            (token,) if token is not None else (),
            delta_text,
            (logprob,) if logprob is not None else (),
            reason,
            result,
        )
        seq.handle._emit(event)
        return event


# --- one-call helpers -----------------------------------------------------------------------------------------------


# A batched prefill pads every prompt to the longest; past this many padded tokens per real one, prefill apart.
PREFILL_PAD_RATIO = 0.5


def _prefill_groups(seqs: list[_Sequence]) -> list[list[_Sequence]]:
    """Admitted sequences in runs of adjacent slots whose prompts are of similar lengths, each prefilled at once."""
    groups: list[list[_Sequence]] = []
    for seq in sorted(seqs, key=lambda s: s.slot):  # type: ignore[arg-type, return-value]
        group = groups[-1] if groups else None
        if group is not None and group[-1].slot + 1 == seq.slot:  # type: ignore[operator]
            lengths = [len(s.prompt) for s in group] + [len(seq.prompt)]
            if max(lengths) * len(lengths) <= (1 + PREFILL_PAD_RATIO) * sum(lengths):
                group.append(seq)
                continue
        groups.append([seq])
    return groups


def _as_params(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise SamplingError(f"got {len(params)} SamplingParams for {n} prompts")
    return params


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    *,
    eos_token_id: int | None,
    tokenizer: TextCodec | None = None,
    decode: Callable[[list[int]], str] | None = None,
    max_batch_size: int | None = None,
    max_seq_len: int | None = None,
    truncate: bool = False,
    compile: bool | DecodeStep = False,
) -> list[GenerationResult]:
    """Generate for a batch of prompts of any lengths, each with its own params; results in prompt order.

    Runs an `Engine` with one slot per prompt (or `max_batch_size` slots, the rest queued) until all finish;
    `compile` compiles its batch-1 decode step first (see `Engine`).
    """
    if not prompts:
        return []
    row_params = _as_params(params, len(prompts))
    engine = Engine(
        model,
        max_batch_size=max_batch_size or len(prompts),
        max_queue=len(prompts),
        max_seq_len=max_seq_len,
        eos_token_id=eos_token_id,
        tokenizer=tokenizer,
        decode=decode,
        compile=compile,
    )
    handles = [
        engine.submit(Request(prompt=p, params=sp, truncate=truncate))
        for p, sp in zip(prompts, row_params, strict=True)
    ]
    while engine.has_work():
        engine.step()
    results = [h.result() for h in handles]
    for result in results:
        _raise_if_failed(result)
    return results


def _raise_if_failed(result: GenerationResult | None) -> None:
    """The one-call helpers raise what the engine's loop keeps to the one request (logits that are not finite)."""
    if result is not None and result.finish_reason == "error":
        raise SamplingError(str(result.error or "generation failed").removeprefix("SamplingError: "))


def stream(
    model: GPT,
    prompt: Sequence[int],
    params: SamplingParams = SamplingParams(),
    *,
    eos_token_id: int | None,
    tokenizer: TextCodec | None = None,
    decode: Callable[[list[int]], str] | None = None,
    max_seq_len: int | None = None,
    truncate: bool = False,
    compile: bool | DecodeStep = False,
) -> Iterator[Event]:
    """Generate for one prompt on the calling thread, yielding an `Event` per token (the last one finished)."""
    engine = Engine(
        model,
        max_batch_size=1,
        max_seq_len=max_seq_len,
        eos_token_id=eos_token_id,
        tokenizer=tokenizer,
        decode=decode,
        compile=compile,
    )
    engine.submit(Request(prompt=prompt, params=params, truncate=truncate))
    while engine.has_work():
        for event in engine.step():
            _raise_if_failed(event.result)
            yield event


@torch.inference_mode()
def generate_naive(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(temperature=0.0),
    *,
    eos_token_id: int | None,
) -> list[list[int]]:
    """The oracle: no cache, one prompt at a time, the whole context re-run for every token.

    Stops on EOS, stop token ids, max_new_tokens and the context limit (stop strings are not checked).
    Returns the generated ids per prompt.
    """
    block_size = model.config.block_size  # type: ignore[union-attr]
    device = next(model.parameters()).device
    outputs = []
    for prompt, p in zip(prompts, _as_params(params, len(prompts)), strict=True):
        generator = make_generator(p.seed, device=device)
        ids = list(prompt)
        out: list[int] = []
        while len(out) < p.max_new_tokens and len(ids) < block_size:
            logits = model(torch.tensor([ids], device=device))[:, -1]  # (1, V)
            (token,) = sample(logits, p, generators=[generator], output_ids=[out], prompt_ids=[list(prompt)])
            ids.append(token)
            out.append(token)
            if (token == eos_token_id and not p.ignore_eos) or token in p.stop_token_ids:
                break
        outputs.append(out)
    return outputs
