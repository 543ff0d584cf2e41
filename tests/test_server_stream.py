"""Streaming at the ASGI level: a client that disconnects mid-stream frees its slot at once."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from server_helpers import slow_engine, tiny_loaders

from tinyllm.server import ServerSettings, create_app
from tinyllm.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)


async def _disconnect_mid_stream(
    app,  # noqa: ANN001
    path: str,
    body: dict,
    *,
    after_chunks: int = 0,
    after_s: float | None = None,
) -> dict:
    """POST `body` as a raw ASGI call, disconnect after `after_chunks` body chunks (or `after_s`); report."""
    disconnected = asyncio.Event()
    sent_body = False
    chunks: list[bytes] = []
    start: dict = {}

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= after_chunks:
                disconnected.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"localhost")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    async with app.router.lifespan_context(app):
        worker = app.state.workers["custom"]
        task = asyncio.create_task(app(scope, receive, send))
        if after_s is not None:
            await asyncio.sleep(after_s)
            assert worker.active_slots == 1
            disconnected.set()
        await asyncio.wait_for(disconnected.wait(), 10)
        t0 = time.perf_counter()
        while worker.active_slots or worker.queue_depth:
            assert time.perf_counter() - t0 < 2.0, "the slot was not freed"
            await asyncio.sleep(0.005)
        freed_after = time.perf_counter() - t0
        await asyncio.wait_for(task, 5)
        generated = worker.engine.tokens_generated
        counted = -1.0  # the metrics count the cancelled request's tokens too, though no one reads its events now
        for _ in range(200):
            counted = _metric(app, "tinyllm_generated_tokens_total")
            if counted == generated:
                break
            await asyncio.sleep(0.01)
    return {
        "status": start.get("status"),
        "chunks": chunks,
        "freed_after": freed_after,
        "generated": generated,
        "counted": counted,
    }


def _metric(app, name: str) -> float:  # noqa: ANN001
    m = re.search(rf'^{name}{{model="custom"}} (\S+)$', app.state.metrics.render().decode(), re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate/custom", {"prompt": "Hello", "stream": True, "max_new_tokens": 60}),
        ("/v1/completions", {"prompt": "Hello", "stream": True, "max_tokens": 60, "logprobs": 5}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 50}),
    ],
)
def test_disconnect_mid_stream_cancels_the_request(gpt2_tokenizer: Tokenizer, path: str, body: dict) -> None:
    settings = ServerSettings(checkpoint=None, gpt2=None, slots=2, max_queue=4)
    app = create_app(settings, loaders=tiny_loaders(gpt2_tokenizer), engine_factory=slow_engine(0.02))
    out = asyncio.run(_disconnect_mid_stream(app, path, body, after_chunks=3))
    assert out["status"] == 200
    assert out["freed_after"] < 0.5  # at once: within a step or two, not after the remaining ~50 tokens
    assert out["generated"] < 20
    assert out["counted"] == out["generated"] > 0  # /metrics used to miss a disconnected request's tokens
    assert all(c.startswith(b"data: ") for c in out["chunks"])


def test_disconnect_while_waiting_for_a_plain_answer_cancels_too(gpt2_tokenizer: Tokenizer) -> None:
    settings = ServerSettings(checkpoint=None, gpt2=None, slots=2, max_queue=4)
    app = create_app(settings, loaders=tiny_loaders(gpt2_tokenizer), engine_factory=slow_engine(0.02))
    body = {"prompt": "Hello", "max_new_tokens": 60}
    out = asyncio.run(_disconnect_mid_stream(app, "/generate/custom", body, after_s=0.2))
    assert out["freed_after"] < 1.0  # polled twice a second
    assert out["generated"] < 50
    assert out["counted"] == out["generated"] > 0
