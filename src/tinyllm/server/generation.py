"""A group of engine requests seen from the event loop: submit, await events, deadline, disconnect, cancel.

One HTTP request becomes one `GenerationGroup` of one or more engine requests (OpenAI's `n` and list
prompts). Its events arrive tagged with the choice index in one `asyncio.Queue`.

The deadline (`ServerSettings.request_timeout_s`) is handled in two ways, never as a 500:
- no token generated yet (all still queued for a slot): everything is cancelled and the request fails with
  503 `timeout` and Retry-After, so a client backs off from an overloaded server;
- tokens already generated: generation stops there and the choices finish with `finish_reason: "length"`
  (the text so far is returned; a stream ends normally).
A client that disconnects cancels every unfinished request of the group at once, freeing their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tinyllm.engine import Event, Request, RequestHandle, TokenLogprob
from tinyllm.server.errors import ClientClosedError, ServerError, UnavailableError
from tinyllm.server.metrics import Metrics
from tinyllm.server.worker import ModelWorker, TaggedEvent

logger = logging.getLogger(__name__)

_DISCONNECT_POLL_S = 0.5
_COUNT_REST_TIMEOUT_S = 30.0  # after close(), how long the remaining events are awaited for the metrics


@dataclass
class Choice:
    """What one engine request has produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    prompt_truncated: int = 0


class GenerationGroup:
    """Engine requests that answer one HTTP request.

    Args:
        worker: the model's worker.
        requests: one engine request per choice (index = position).
        timeout_s: the deadline, from now.
        metrics: where token counts and latencies go.
        is_disconnected: polled while waiting (e.g. `starlette.requests.Request.is_disconnected`).
    """

    def __init__(
        self,
        *,
        worker: ModelWorker,
        requests: Sequence[Request],
        timeout_s: float,
        metrics: Metrics,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.worker = worker
        self.requests = list(requests)
        self.choices = [Choice(index=i) for i in range(len(self.requests))]
        self.metrics = metrics
        self._is_disconnected = is_disconnected
        self._queue: asyncio.Queue[TaggedEvent] = asyncio.Queue()
        self._handles: list[RequestHandle] = []
        self._timed_out: set[int] = set()
        self._start = time.perf_counter()
        self._deadline = self._start + timeout_s
        self._first_token_at: float | None = None
        self._next_poll = self._start + _DISCONNECT_POLL_S
        self._finished = 0
        self._ran = False  # whether any of its requests got a slot (see `_apply`)
        self._counting: asyncio.Task[None] | None = None
        self._cancel_requested = False  # a "cancelled" finish we did not ask for is the server shutting down

    @property
    def done(self) -> bool:
        return self._finished == len(self.requests)

    def submit(self) -> None:
        """Queue every request (raises the engine's QueueFull / PromptTooLong / Sampling errors, all or none)."""
        loop = asyncio.get_running_loop()
        try:
            for i, request in enumerate(self.requests):
                self._handles.append(self.worker.submit(request, queue=self._queue, index=i, loop=loop))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel every unfinished request (idempotent)."""
        self._cancel_requested = True
        for i, handle in enumerate(self._handles):
            if self.choices[i].finish_reason is None and not handle.done:
                self.worker.cancel(handle)

    def close(self) -> None:
        """The consumer is gone: cancel what is unfinished, and count the tokens of the events nobody will read
        (the cancelled requests' last ones) into the metrics in the background (idempotent)."""
        self.cancel()
        if self.done or self._counting is not None:
            return
        with contextlib.suppress(RuntimeError):  # no running event loop: nothing can arrive any more
            self._counting = asyncio.get_running_loop().create_task(self._count_the_rest())

    async def _count_the_rest(self) -> None:
        while not self.done:
            try:
                index, event = await asyncio.wait_for(self._queue.get(), timeout=_COUNT_REST_TIMEOUT_S)
            except asyncio.TimeoutError:
                return
            with contextlib.suppress(Exception):  # an engine error here has no one to answer
                self._apply(index, event)

    async def events(self) -> AsyncIterator[TaggedEvent]:
        """Events as they come, each already applied to `self.choices`, until every choice has finished.

        Raises:
            UnavailableError: the deadline passed before any token was generated.
            ClientClosedError: the client disconnected.
            ServerError: the engine failed a request (the details go to the log).
        """
        try:
            while not self.done:
                event = await self._next()
                if event is None:
                    continue
                yield event
        finally:
            self.close()  # on any exit (including the consumer closing us) nothing keeps running

    async def _next(self) -> TaggedEvent | None:
        now = time.perf_counter()
        if now >= self._deadline and not self._timed_out:
            self._expire()
            return None
        if self._is_disconnected is not None and now >= self._next_poll:
            self._next_poll = now + _DISCONNECT_POLL_S
            if await self._is_disconnected():
                self.cancel()
                raise ClientClosedError("the client closed the connection")
        if not self._queue.empty():  # the common case while tokens flow: no timer, no task
            index, event = self._queue.get_nowait()
        else:
            timeout = None if self._timed_out else self._deadline - now
            if self._is_disconnected is not None:
                timeout = min(timeout or _DISCONNECT_POLL_S, max(0.0, self._next_poll - now))
            try:
                index, event = await asyncio.wait_for(self._queue.get(), timeout=timeout)
            except asyncio.TimeoutError:
                return None
        self._apply(index, event)
        return index, event

    def _expire(self) -> None:
        unfinished = [i for i, c in enumerate(self.choices) if c.finish_reason is None]
        self.cancel()
        if self._first_token_at is None:
            waited = time.perf_counter() - self._start
            logger.warning("request timed out after %.1f s without a slot (model %s)", waited, self.worker.name)
            raise UnavailableError(
                f"no slot became free within {waited:.1f} s: the server is busy; retry later",
                code="timeout",
                headers={"Retry-After": "5"},
            )
        self._timed_out.update(unfinished)

    def _apply(self, index: int, event: Event) -> None:
        choice = self.choices[index]
        now = time.perf_counter()
        if event.token_ids and self._first_token_at is None:
            self._first_token_at = now
            self.metrics.ttft_seconds.labels(self.worker.name).observe(now - self._start)
        choice.text += event.text
        choice.token_ids += event.token_ids
        choice.logprobs += event.logprobs
        if event.finish_reason is None:
            return
        self._finished += 1
        result = event.result
        reason: str = event.finish_reason
        if reason == "cancelled" and index in self._timed_out:
            reason = "length"  # stopped by the deadline: cut short like a token limit
        elif reason == "cancelled" and not self._cancel_requested:  # the worker cancelled it
            self.cancel()
            if self.worker.shutting_down:
                raise UnavailableError(
                    "the server is shutting down; retry shortly", code="shutting_down", headers={"Retry-After": "5"}
                )
            raise UnavailableError(  # its engine loop stopped: the model is gone, retrying will not help
                f"model {self.worker.name!r} stopped: {self.worker.error or 'see the server log'}",
                code="model_unavailable",
            )
        if reason == "error":
            self.cancel()
            logger.error("generation failed on model %s: %s", self.worker.name, result.error if result else "?")
            raise ServerError("generation failed; the server log has the details", code="generation_failed")
        choice.finish_reason = reason
        if result is not None:
            choice.prompt_tokens = result.prompt_tokens
            choice.prompt_truncated = result.prompt_truncated
            if result.text is not None and reason != "cancelled":
                choice.text = result.text
        # a request cancelled (or out of time) while it waited for a slot never ran: no prompt read, no generation
        # to time (a slot's prefill gives the first token in the same step, so "ran" is "has a token")
        ran = bool(choice.token_ids) or reason not in ("cancelled", "length")
        self._ran = self._ran or ran
        if ran:
            self.metrics.prompt_tokens.labels(self.worker.name).inc(choice.prompt_tokens)
        self.metrics.generated_tokens.labels(self.worker.name).inc(len(choice.token_ids))
        if self.done and self._ran:
            self.metrics.generation_seconds.labels(self.worker.name).observe(now - self._start)

    def hand_over_to_stream(self) -> None:
        """Stop polling for a disconnect: a `StreamingResponse` watches the connection itself (and cancels us)."""
        self._is_disconnected = None

    async def run(self) -> list[Choice]:
        """Run to the end and return the choices."""
        async for _ in self.events():
            pass
        return self.choices

    async def first_event(self) -> TaggedEvent | None:
        """Wait for the first event (so errors before any token can still become a status code)."""
        while not self.done:
            event = await self._next()
            if event is not None:
                return event
        return None

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


def sse(data: str) -> bytes:
    """One server-sent event carrying `data` (a JSON document or `[DONE]`)."""
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


class EventStream(StreamingResponse):
    """A `text/event-stream` response that cancels its group however it ends (done, error, disconnect).

    Starlette cancels the body iterator when the client disconnects; an iterator that never started would
    not run its own cleanup, so the cancel lives here.
    """

    def __init__(self, content: AsyncIterator[bytes], *, group: GenerationGroup) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._group = group
        group.hand_over_to_stream()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._group.close()
