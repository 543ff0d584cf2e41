"""A real uvicorn on a free loopback port, driven by the official `openai` SDK and by plain httpx."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from server_helpers import gpt2_tokenizer_or_skip, slow_engine, tiny_loaders

from tinyllm.server import ServerSettings, create_app

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(60)

API_KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[str, FastAPI]]:
    """(base URL, app) of a server running in a thread; slow steps (10 ms) so a stream can be interrupted."""
    tokenizer = gpt2_tokenizer_or_skip()
    port = _free_port()
    settings = ServerSettings(port=port, checkpoint=None, gpt2=None, api_key=API_KEY, slots=4)
    app = create_app(settings, loaders=tiny_loaders(tokenizer), engine_factory=slow_engine(0.01))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def client(live: tuple[str, FastAPI]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live[0]}/v1", api_key=API_KEY, max_retries=0, timeout=20)


def test_sdk_lists_models(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {"custom", "gpt2"}
    assert client.models.retrieve("gpt2").id == "gpt2"  # GET /v1/models/{id}: a 404 before
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_sdk_completion_with_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model="custom", prompt="Hello", max_tokens=5, logprobs=5, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 5
    assert len(choice.logprobs.tokens) == 5
    lp = choice.logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) in (5, 6) and top[token] == logprob  # the top 5, and the sampled token if not among them


def test_sdk_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="gpt2", prompt="Hello", max_tokens=6, stream=True, logprobs=2, stream_options={"include_usage": True}
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert sum(len(c.choices[0].logprobs.tokens) for c in text_chunks) == 6
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_sdk_chat_and_chat_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say hi"}]
    out = client.chat.completions.create(model="custom", messages=messages, max_tokens=5, logprobs=True, top_logprobs=2)
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens
    stream = client.chat.completions.create(model="custom", messages=messages, max_tokens=5, stream=True, seed=3)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    again = client.chat.completions.create(model="custom", messages=messages, max_tokens=5, seed=3)
    assert streamed == again.choices[0].message.content


def test_sdk_errors_are_its_usual_exceptions(live: tuple[str, FastAPI]) -> None:
    bad_key = openai.OpenAI(base_url=f"{live[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    good = openai.OpenAI(base_url=f"{live[0]}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        good.completions.create(model="gpt-4", prompt="x")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        good.completions.create(model="custom", prompt="word " * 100)
    assert info.value.code == "context_length_exceeded"


def test_plain_httpx_seed_route_and_stream_disconnect(live: tuple[str, FastAPI]) -> None:
    base, app = live
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=base, headers=headers, timeout=20) as http:
        assert http.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}
        r = http.post("/generate/custom", json={"prompt": "The future of AI is", "max_new_tokens": 4})
        assert r.status_code == 200 and r.json()["generated_text"].startswith("The future of AI is")
        assert r.headers["x-request-id"]
        worker = app.state.workers["custom"]
        body = {"prompt": "Hello", "stream": True, "max_new_tokens": 60}
        with http.stream("POST", "/generate/custom", json=body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            assert worker.active_slots == 1
        deadline = time.monotonic() + 2  # closing the connection cancels the request server-side
        while worker.active_slots:
            assert time.monotonic() < deadline, "slot still busy after the client left"
            time.sleep(0.01)
        assert 'tinyllm_active_slots{model="custom"} 0.0' in http.get("/metrics").text


def test_a_stop_signal_under_load_answers_503_and_ends_streams_cleanly() -> None:
    """SIGTERM with requests in flight: uvicorn drained connections while the engine worked through its queue,
    then cancelled the handlers after 5 s (plain-text 500s, streams cut without [DONE])."""
    import json
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from tinyllm.server.app import GracefulServer

    tokenizer = gpt2_tokenizer_or_skip()
    port = _free_port()
    settings = ServerSettings(port=port, checkpoint=None, gpt2=None, slots=1, max_queue=8)
    app = create_app(settings, loaders=tiny_loaders(tokenizer), engine_factory=slow_engine(0.02))
    server = GracefulServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}/v1/completions"
    body = {"prompt": "Hello", "max_tokens": 60, "temperature": 0}

    def plain() -> httpx.Response:
        return httpx.post(url, json=body, timeout=30)

    def streamed() -> list[str]:
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as r:
            return [line for line in r.iter_lines() if line]

    with ThreadPoolExecutor(4) as pool:
        stream = pool.submit(streamed)  # takes the one slot; the others queue
        time.sleep(0.3)
        queued = [pool.submit(plain) for _ in range(3)]
        time.sleep(0.3)
        started = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        answers = [f.result() for f in queued]
        lines = stream.result()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 4  # well inside the 5 s grace
    for r in answers:
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "shutting_down"
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
