"""Fakes shared by the server tests: a tiny random GPT, ready-made loaders, engines that can be held or slowed."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from fastapi.testclient import TestClient

from tinyllm.config import ModelConfig
from tinyllm.engine import Engine, Event
from tinyllm.model import GPT
from tinyllm.server import ServerSettings, create_app
from tinyllm.server.worker import EngineFactory, LoadedModel, Loader, default_engine
from tinyllm.tokenizer import Tokenizer

LOCAL = "http://localhost"  # a loopback server answers only to loopback host names (TestClient's is "testserver")
BLOCK_SIZE = 64


def gpt2_tokenizer_or_skip() -> Tokenizer:
    """The real GPT-2 BPE for module-scoped fixtures (conftest's `gpt2_tokenizer` is per test)."""
    import pytest

    from tinyllm import assets
    from tinyllm.tokenizer import get_tokenizer

    if not assets.gpt2_ranks_path().exists():
        pytest.skip("GPT-2 BPE ranks not fetched; run `tinyllm fetch-assets`")
    return get_tokenizer()


@functools.cache
def tiny_model(seed: int = 0) -> GPT:
    """1 layer, n_embd 32, GPT-2's vocabulary, a 64-token context: random weights, eval mode."""
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK_SIZE)).eval()


def ready(tokenizer: Tokenizer, *, seed: int = 0) -> Loader:
    return lambda: LoadedModel(tiny_model(seed), tokenizer, {"source": "test"})


def tiny_loaders(tokenizer: Tokenizer) -> dict[str, Loader]:
    return {"custom": ready(tokenizer), "gpt2": ready(tokenizer, seed=1)}


class HeldEngine(Engine):
    """An engine whose steps wait for `gate` (so requests stay queued until a test lets them go)."""

    gate: threading.Event

    def step(self) -> list[Event]:
        while not self.gate.wait(0.05):
            if self._stopping:
                return []
        return super().step()

    _stopping = False

    def cancel_all(self) -> None:
        self._stopping = True
        super().cancel_all()


def held_engine(gate: threading.Event) -> EngineFactory:
    def make(loaded: LoadedModel, settings: ServerSettings) -> Engine:
        engine = HeldEngine(
            loaded.model,
            max_batch_size=settings.slots,
            max_queue=settings.max_queue,
            eos_token_id=None,  # never stop early: lengths are predictable
            tokenizer=loaded.tokenizer,
        )
        engine.gate = gate
        return engine

    return make


class SlowEngine(Engine):
    """Every step takes at least `delay` seconds and EOS is ignored, so a generation lasts long enough to interrupt."""

    delay = 0.05

    def step(self) -> list[Event]:
        time.sleep(self.delay)
        return super().step()


def slow_engine(delay: float = 0.05) -> EngineFactory:
    def make(loaded: LoadedModel, settings: ServerSettings) -> Engine:
        engine = SlowEngine(
            loaded.model, max_batch_size=settings.slots, max_queue=settings.max_queue, tokenizer=loaded.tokenizer
        )
        engine.delay = delay
        return engine

    return make


@contextmanager
def serving(
    tokenizer: Tokenizer,
    *,
    settings: ServerSettings | None = None,
    loaders: dict[str, Loader] | None = None,
    engine_factory: EngineFactory = default_engine,
    **client_kwargs: Any,
) -> Iterator[TestClient]:
    """An in-process client of an app serving tiny models (the lifespan runs, so the workers are up)."""
    settings = settings or ServerSettings(checkpoint=None, gpt2=None, slots=4, max_queue=8)
    app = create_app(
        settings, loaders=loaders if loaders is not None else tiny_loaders(tokenizer), engine_factory=engine_factory
    )
    client_kwargs.setdefault("base_url", LOCAL)
    with TestClient(app, raise_server_exceptions=False, **client_kwargs) as client:
        yield client


def sse_data(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing (each event one data line, blank-line separated)."""
    assert body.endswith("\n\n"), body[-50:]
    events = body.split("\n\n")[:-1]
    out = []
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
        out.append(event[len("data: ") :])
    return out


def sse_json(body: str) -> list[dict[str, Any]]:
    """The JSON events of an SSE body that ends with `data: [DONE]`."""
    data = sse_data(body)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]
