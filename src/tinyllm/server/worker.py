"""One worker per model: a thread that loads the model, then owns its `Engine` and loops `step()`.

Torch never runs on the event loop. The event loop only calls `Engine.submit` and `Engine.cancel` (cheap,
thread-safe, no tensors); each request's events come back from the worker thread through
`loop.call_soon_threadsafe` into an `asyncio.Queue` that the request's coroutine awaits.

A model that cannot load leaves its worker `unavailable` with the loader's message; the server stays up and
the model's routes answer 503 with that message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tinyllm.engine import Engine, Event, Request, RequestHandle
from tinyllm.errors import TinyLLMError
from tinyllm.model import GPT
from tinyllm.server.errors import UnavailableError
from tinyllm.server.settings import ServerSettings
from tinyllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

WorkerState = Literal["loading", "ready", "unavailable", "stopped"]
# What a request's queue carries: (choice index, engine event).
TaggedEvent = tuple[int, Event]


@dataclass
class LoadedModel:
    """A model ready to serve: the module (eval mode), its tokenizer and what to tell about it."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)


Loader = Callable[[], LoadedModel]
"""Loads a model on the worker's thread; raises a `TinyLLMError` whose message says how to fix it."""

EngineFactory = Callable[[LoadedModel, ServerSettings], Engine]


def default_engine(loaded: LoadedModel, settings: ServerSettings) -> Engine:
    """The production engine: `settings.slots` slots, a queue of `settings.max_queue`, EOS = end-of-text, and
    with `settings.compile` its batch-1 decode step compiling in the background."""
    engine = Engine(
        loaded.model,
        max_batch_size=settings.slots,
        max_queue=settings.max_queue,
        max_seq_len=settings.max_context,
        eos_token_id=loaded.tokenizer.eot_token,
        tokenizer=loaded.tokenizer,
    )
    if settings.compile:
        engine.compile_decode(background=True)
    return engine


class ModelWorker:
    """Loads one model on its own thread, then runs its engine loop there until `stop()`.

    Args:
        name: the model's public id ("custom", "gpt2").
        loader: builds the model (runs on the worker thread).
        settings: slots, queue size and device.
        engine_factory: builds the engine around the loaded model (tests inject slow or gated engines).
    """

    def __init__(
        self,
        *,
        name: str,
        loader: Loader,
        settings: ServerSettings,
        engine_factory: EngineFactory = default_engine,
    ) -> None:
        self.name = name
        self._loader = loader
        self._settings = settings
        self._engine_factory = engine_factory
        self.state: WorkerState = "loading"
        self.error: str | None = None
        self._error_code = "model_unavailable"  # the code a 503 for this model carries
        self.shutting_down = False
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self._loaded_event = threading.Event()
        self._stop = threading.Event()
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
        self._thread = threading.Thread(target=self._main, name=f"tinyllm-worker-{name}", daemon=True)

    # -- lifecycle (called from the app's lifespan) ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (either way); False on timeout. Call it off the event loop."""
        return self._loaded_event.wait(timeout)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Cancel what is in flight and end the thread (a model still loading is abandoned: daemon thread)."""
        self._stop.set()
        if self.engine is not None:
            self.engine.cancel_all()
            self.engine.wake()
        if self._thread.is_alive() and self._loaded_event.is_set():
            self._thread.join(timeout)
        self.state = "stopped"

    def _main(self) -> None:
        threads = self._settings.resolved_torch_threads()
        if threads is not None:
            torch.set_num_threads(threads)  # for this thread's OpenMP team too, not only the global setting
        try:
            loaded = self._loader()
            engine = self._engine_factory(loaded, self._settings)
        except TinyLLMError as exc:
            self.error = str(exc)
            self._error_code = getattr(exc, "code", None) or "model_unavailable"  # e.g. model_disabled
            self.state = "unavailable"
            logger.warning("model %r is unavailable: %s", self.name, exc)
        except Exception as exc:  # a bug or an unexpected library error: keep the server up, say what broke
            logger.exception("model %r failed to load", self.name)
            self.error = f"loading failed ({type(exc).__name__}: {exc}); see the server log"
            self.state = "unavailable"
        else:
            self.loaded, self.engine = loaded, engine
            self.state = "ready"
            logger.info("model %r ready: %s", self.name, _describe(loaded, engine))
        finally:
            self._loaded_event.set()
        if self.engine is not None and not self._stop.is_set():
            try:
                self.engine.run(self._stop)
            except Exception:  # the loop itself broke (a step failure is handled inside run): stop serving it
                logger.exception("the engine loop of model %r stopped", self.name)
                self.error, self.state = "its engine loop stopped; see the server log", "unavailable"
                self.engine.cancel_all()

    # -- what routes use ---------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def begin_shutdown(self) -> None:
        """The server is stopping: refuse new requests and end those in flight now (their groups answer 503,
        or end a stream with the reason), instead of working through the queue until the HTTP server's
        graceful-shutdown timeout cancels the handlers mid-answer."""
        self.shutting_down = True
        if self.engine is not None:
            self.engine.cancel_all()

    def require(self) -> tuple[Engine, LoadedModel]:
        """The engine and model, or a 503 that says why they are not there."""
        if self.shutting_down:
            raise UnavailableError(
                "the server is shutting down; retry shortly", code="shutting_down", headers={"Retry-After": "5"}
            )
        if self.state == "ready" and self.engine is not None and self.loaded is not None:
            return self.engine, self.loaded
        if self.state == "loading":
            raise UnavailableError(
                f"model {self.name!r} is still loading; retry in a few seconds",
                code="model_loading",
                headers={"Retry-After": "5"},
            )
        reason = self.error or "the server is shutting down"
        message = (
            reason if reason.startswith(f"model {self.name!r}") else f"model {self.name!r} is not available: {reason}"
        )
        # not a moment's state: OpenAI's SDKs retry a 503 unless told it would not help
        raise UnavailableError(message, code=self._error_code, headers={"x-should-retry": "false"})

    def submit(
        self, request: Request, *, queue: asyncio.Queue[TaggedEvent], index: int, loop: asyncio.AbstractEventLoop
    ) -> RequestHandle:
        """Queue a request; its events arrive in `queue` tagged with `index`. Raises the engine's errors."""
        engine, _ = self.require()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _Mailbox(loop)
        return engine.submit(request, on_event=lambda event: mailbox.post(queue, (index, event)))

    def cancel(self, handle: RequestHandle) -> None:
        """Stop a request now and free its slot (no-op if it has finished)."""
        if self.engine is not None:
            self.engine.cancel(handle)

    @property
    def queue_depth(self) -> int:
        return self.engine.num_waiting if self.engine is not None else 0

    @property
    def active_slots(self) -> int:
        return self.engine.num_active if self.engine is not None else 0

    def describe(self) -> dict[str, Any]:
        """State and facts for /ready and /v1/models."""
        info: dict[str, Any] = {"id": self.name, "state": self.state}
        if self.error:
            info["error"] = self.error
        if self.loaded is not None and self.engine is not None:
            config = self.loaded.model.config
            info.update(
                context_length=self.engine.context_limit,
                parameters=self.loaded.model.num_params(),
                n_layer=config.n_layer,
                n_embd=config.n_embd,
                slots=self.engine.max_batch_size,
                max_queue=self.engine.max_queue,
                source=str(self.loaded.meta.get("source", "")) or None,
                device=str(self.engine.device),
                decode="compiled" if self.engine.compiled else "eager",  # a lone request's decode step
                decode_step=self.engine.decode_step,  # which: "c", "inductor" or "eager"
            )
        return info


class _Mailbox:
    """Events from the worker thread to one event loop, with at most one wake-up of the loop pending.

    A decode step emits one event per active request; waking the loop once per step instead of once per
    event keeps the event loop and the worker from trading the GIL back and forth.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[TaggedEvent], TaggedEvent]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue[TaggedEvent], item: TaggedEvent) -> None:
        """Called on the worker thread."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """Called on the event loop."""
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def _describe(loaded: LoadedModel, engine: Engine) -> str:
    c = loaded.model.config
    device = next(loaded.model.parameters()).device
    limit = getattr(engine, "context_limit", c.block_size)
    context = f"context {limit}" + (f" (of its {c.block_size}: TINYLLM_MAX_CONTEXT)" if limit < c.block_size else "")
    cache = getattr(engine, "cache", None)
    kv = f", KV cache {cache.nbytes / 2**20:.0f} MiB" if cache is not None else ""
    return f"{loaded.model.num_params() / 1e6:.1f}M parameters, {c.n_layer} layers, {context}{kv}, on {device}"


# --- default loaders --------------------------------------------------------------------------------------------


def _prepare(model: GPT) -> GPT:
    from tinyllm.engine import prepare_for_inference

    prepared = prepare_for_inference(model)
    assert isinstance(prepared, GPT)
    return prepared


def custom_loader(checkpoint: str, *, device: str = "cpu") -> Loader:
    """Loads a trained checkpoint (a checkpoint directory, or a run directory holding best/ or last/)."""

    def load() -> LoadedModel:
        from tinyllm.checkpoint import checkpoint_tokenizer, find_checkpoint, load_checkpoint

        path = find_checkpoint(checkpoint)
        if path is None:
            where = Path(checkpoint)
            raise UnavailableError(
                f"no trained checkpoint in {where} (looked for {where}/best, {where}/last and {where} itself): "
                "train one with `tinyllm train` or `make run`, or point the server at one with "
                "`--checkpoint DIR` / TINYLLM_CHECKPOINT",
                code="model_unavailable",
            )
        loaded = load_checkpoint(path, device=device)
        tokenizer = checkpoint_tokenizer(path, loaded.meta)
        return LoadedModel(_prepare(loaded.model), tokenizer, {**loaded.meta, "source": str(path)})

    return load


def gpt2_loader(source: str, *, device: str = "cpu") -> Loader:
    """Loads pretrained GPT-2 from a hub id or a local Hugging Face directory."""

    def load() -> LoadedModel:
        from tinyllm.checkpoint import check_tokenizer_fits
        from tinyllm.gpt2 import load_gpt2
        from tinyllm.tokenizer import gpt2_source_tokenizer

        model = load_gpt2(source, device=device)
        tokenizer = gpt2_source_tokenizer(source)
        check_tokenizer_fits(model, tokenizer, source)
        return LoadedModel(_prepare(model), tokenizer, {"source": source, "kind": "gpt2"})

    return load


def disabled_loader(name: str, how_to_enable: str) -> Loader:
    """A loader for a model switched off in the settings."""

    def load() -> LoadedModel:
        raise UnavailableError(f"model {name!r} is disabled in this server; {how_to_enable}", code="model_disabled")

    return load


def default_loaders(settings: ServerSettings) -> Mapping[str, Loader]:
    """The two models the server offers: "custom" (your checkpoint) and "gpt2" (pretrained)."""
    device = str(settings.resolved_device())
    return {
        "custom": custom_loader(settings.checkpoint, device=device)
        if settings.checkpoint
        else disabled_loader("custom", "start it with --checkpoint DIR"),
        "gpt2": gpt2_loader(settings.gpt2, device=device)
        if settings.gpt2
        else disabled_loader("gpt2", "start it without --no-gpt2, with TINYLLM_GPT2 unset or a hub id or directory"),
    }
