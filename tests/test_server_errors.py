"""Every failure the server can meet, mapped to one status and one JSON shape (never a traceback)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from server_helpers import held_engine, serving, slow_engine, tiny_model

from tinyllm.engine import Engine, PromptTooLongError, QueueFullError
from tinyllm.sampling import SamplingError
from tinyllm.server import ServerSettings, create_app
from tinyllm.server.errors import to_api_error
from tinyllm.server.settings import SettingsError
from tinyllm.server.worker import LoadedModel
from tinyllm.tokenizer import Tokenizer

SETTINGS = ServerSettings(checkpoint=None, gpt2=None, slots=2, max_queue=4)

pytestmark = pytest.mark.timeout(60)


def _openai_error(r, status: int) -> dict:  # noqa: ANN001
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _flat_error(r, status: int) -> dict:  # noqa: ANN001
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "type", "param", "code"} and isinstance(body["detail"], str)
    return body


# --- models that are not there -----------------------------------------------------------------------------------


def test_missing_models_leave_the_server_up_with_503s_that_say_how_to_fix(tmp_path: Path) -> None:
    settings = ServerSettings(checkpoint=str(tmp_path / "runs" / "default"), gpt2=str(tmp_path / "no-gpt2"))
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        custom = _flat_error(client.post("/generate/custom", json={"prompt": "hi"}), 503)
        assert "tinyllm train" in custom["detail"] and "make run" in custom["detail"]
        gpt2 = _flat_error(client.post("/generate/gpt2", json={"prompt": "hi"}), 503)
        assert "GPT-2 weights" in gpt2["detail"] and "not available" in gpt2["detail"]
        err = _openai_error(client.post("/v1/completions", json={"model": "gpt2", "prompt": "hi"}), 503)
        assert err["type"] == "service_unavailable" and err["code"] == "model_unavailable"
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert not models["custom"]["ready"] and "tinyllm train" in models["custom"]["error"]


def test_disabled_gpt2_says_how_to_enable() -> None:
    with TestClient(create_app(SETTINGS), base_url="http://localhost") as client:
        r = client.post("/generate/gpt2", json={"prompt": "hi"})
        body = _flat_error(r, 503)
        assert body["code"] == "model_disabled" and "disabled" in body["detail"]
        assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers  # waiting will not help
        oa = client.post("/v1/completions", json={"model": "gpt2", "prompt": "hi"})
        assert _openai_error(oa, 503)["code"] == "model_disabled" and oa.headers["x-should-retry"] == "false"


def test_a_slow_model_is_503_loading_until_it_is_ready(gpt2_tokenizer: Tokenizer) -> None:
    release = threading.Event()

    def slow_loader() -> LoadedModel:
        release.wait(10)
        return LoadedModel(tiny_model(), gpt2_tokenizer)

    settings = SETTINGS.replace(load_wait_s=0.05)
    with TestClient(create_app(settings, loaders={"custom": slow_loader}), base_url="http://localhost") as client:
        r = client.post("/generate/custom", json={"prompt": "hi", "max_new_tokens": 2})
        assert _flat_error(r, 503)["code"] == "model_loading" and r.headers["retry-after"] == "5"
        assert client.get("/ready").json()["models"]["custom"]["state"] == "loading"
        release.set()
        _wait_until(lambda: client.get("/ready").status_code == 200)
        assert client.post("/generate/custom", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_real_checkpoint_and_local_gpt2_directory_load(tmp_path: Path, gpt2_tokenizer: Tokenizer) -> None:
    from safetensors.torch import save_file

    from tinyllm.checkpoint import save_checkpoint
    from tinyllm.gpt2 import hf_config_dict, to_hf_state_dict

    run = tmp_path / "run"
    save_checkpoint(run / "best", model=tiny_model(), meta={"step": 1})
    hf_dir = tmp_path / "hf"  # what `hf download openai-community/gpt2` leaves, for a tiny model
    hf_dir.mkdir()
    state = {k: v.contiguous() for k, v in to_hf_state_dict(tiny_model()).items() if k != "lm_head.weight"}
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps(hf_config_dict(tiny_model().config)))
    settings = ServerSettings(checkpoint=str(run), gpt2=str(hf_dir), slots=2)
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        assert client.get("/ready").json()["status"] == "ready"
        body = {"prompt": "Hello", "max_new_tokens": 3, "temperature": 0}
        a = client.post("/generate/custom", json=body)
        b = client.post("/generate/gpt2", json=body)
        assert a.status_code == b.status_code == 200
        assert a.json() == b.json()  # the same weights through both loaders


def test_a_gpt2_directory_whose_vocabulary_the_tokenizer_overruns_is_unavailable(tmp_path: Path) -> None:
    """No vocab.json beside a 1,000-token model: GPT-2's tokenizer was paired with it, the model said "ready",
    and every prompt (even an empty one) was a 400 blaming the client."""
    from safetensors.torch import save_file

    from tinyllm.config import ModelConfig
    from tinyllm.gpt2 import hf_config_dict, to_hf_state_dict
    from tinyllm.model import GPT

    small = GPT(ModelConfig(vocab_size=1000, n_layer=1, n_head=2, n_embd=32, block_size=32)).eval()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    state = {k: v.contiguous() for k, v in to_hf_state_dict(small).items() if k != "lm_head.weight"}
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps(hf_config_dict(small.config)))
    with TestClient(
        create_app(ServerSettings(checkpoint=None, gpt2=str(hf_dir), slots=1)), base_url="http://localhost"
    ) as client:
        gpt2 = client.get("/ready").json()["models"]["gpt2"]
        assert gpt2["state"] == "unavailable" and "1000-token vocabulary" in gpt2["error"]
        r = client.post("/generate/gpt2", json={"prompt": "Hello"})
        assert r.status_code == 503 and "vocab.json" in r.json()["detail"]
        off = client.post("/generate/custom", json={"prompt": "Hello"})  # switched off, and the code says so
        assert off.status_code == 503 and off.json()["code"] == "model_disabled"


# --- auth, size, validation --------------------------------------------------------------------------------------


def test_api_key_is_required_everywhere_but_health(gpt2_tokenizer: Tokenizer) -> None:
    with serving(gpt2_tokenizer, settings=SETTINGS.replace(api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert _flat_error(r, 401)["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
        _openai_error(client.get("/v1/models"), 401)
        _openai_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        _flat_error(client.get("/metrics"), 401)
        _flat_error(client.post("/generate/custom", json={"prompt": "x"}), 401)
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert "s3cret" not in client.get("/openapi.json").text
        metrics = client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).text
        # answered before routing, yet counted under their routes (they were all "unmatched")
        assert 'route="/generate/custom",status="401"' in metrics and 'route="/v1/models",status="401"' in metrics


def test_body_limit_by_content_length_and_by_streamed_body(gpt2_tokenizer: Tokenizer) -> None:
    with serving(gpt2_tokenizer, settings=SETTINGS.replace(max_body_bytes=300)) as client:
        big = {"prompt": "x" * 400}
        assert "300 bytes" in _flat_error(client.post("/generate/custom", json=big), 413)["detail"]
        assert _openai_error(client.post("/v1/completions", json=big), 413)["code"] == "request_too_large"

        def chunks():  # no Content-Length: sent chunked
            for _ in range(10):
                yield b'{"prompt": "' + b"y" * 50

        r = client.post("/generate/custom", content=chunks(), headers={"Content-Type": "application/json"})
        _flat_error(r, 413)
        assert client.post("/generate/custom", json={"prompt": "small", "max_new_tokens": 1}).status_code == 200
        assert 'route="/v1/completions",status="413"' in client.get("/metrics").text
        assert 'route="unmatched",status="404"' in (client.get("/nowhere"), client.get("/metrics"))[1].text


def test_validation_errors_name_the_field(gpt2_tokenizer: Tokenizer) -> None:
    with serving(gpt2_tokenizer, settings=SETTINGS) as client:
        assert _flat_error(client.post("/generate/custom", json={}), 422)["param"] == "prompt"
        bad_temp = client.post("/generate/custom", json={"prompt": "x", "temperature": 9})
        assert _flat_error(bad_temp, 422)["param"] == "temperature"
        typo = client.post(
            "/generate/custom", json={"prompt": "x", "max_tokens": 9}
        )  # the seed's name is max_new_tokens
        assert _flat_error(typo, 422)["param"] == "max_tokens"
        # OpenAI's routes answer 400 (the SDK's BadRequestError), naming the field all the same
        assert _openai_error(client.post("/v1/completions", json={"prompt": "x", "n": 0}), 400)["param"] == "n"
        msgs = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        assert _openai_error(msgs, 400)["param"] == "messages.0.role"
        # a union field names the reason of the branch the input's type chose, not "should be a valid string"
        for body, reason in (
            ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop: List should have at most 4 items"),
            ({"prompt": []}, "prompt: List should have at least 1 item"),
            ({"prompt": [[]]}, "prompt.0: List should have at least 1 item"),
            ({"prompt": "a", "stop": ["a" * 100]}, "stop.0: String should have at most 64 characters"),
        ):
            message = _openai_error(client.post("/v1/completions", json=body), 400)["message"]
            assert message.startswith(reason) and "valid string" not in message, (body, message)
        raw = client.post("/generate/custom", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
        assert _flat_error(raw, 400)["code"] == "invalid_json"
        _openai_error(
            client.post("/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"}), 400
        )
        latin1 = client.post(
            "/v1/completions", content=b'{"prompt": "\xe9"}', headers={"Content-Type": "application/json"}
        )
        err = _openai_error(latin1, 400)  # FastAPI's "There was an error parsing the body", code null, before
        assert err["code"] == "invalid_json" and "not UTF-8" in err["message"]
        # valid JSON sent without saying so (curl -d's form type, text/plain, none): 415 saying what to send
        kinds = ["application/x-www-form-urlencoded", "text/plain", "text/json", "application/jsonp", "json"]
        for headers in [{"Content-Type": kind} for kind in kinds] + [{}]:
            body = _flat_error(client.post("/generate/custom", content=b'{"prompt": "x"}', headers=headers), 415)
            assert "Content-Type: application/json" in body["detail"] and body["code"] == "unsupported_media_type"
        chat = client.post("/v1/chat/completions", content=b"{}", headers={"Content-Type": "text/plain"})
        assert "application/json" in _openai_error(chat, 415)["message"]


def test_openai_features_not_implemented_are_refused_not_ignored(gpt2_tokenizer: Tokenizer) -> None:
    """Before, they were dropped with the unknown fields: a 200 the client took for an answer that honoured them."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serving(gpt2_tokenizer, settings=SETTINGS) as client:
        for route, body, param in (
            ("/v1/completions", {"prompt": "x", "logit_bias": {"50256": -100}}, "logit_bias"),
            ("/v1/completions", {"prompt": "x", "suffix": " end"}, "suffix"),
            ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
            ("/v1/chat/completions", {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ("/v1/chat/completions", {**chat, "tool_choice": "required"}, "tool_choice"),
            ("/v1/chat/completions", {**chat, "functions": [{"name": "f"}]}, "functions"),
            ("/v1/chat/completions", {**chat, "response_format": {"type": "json_object"}}, "response_format"),
        ):
            err = _openai_error(client.post(route, json=body), 400)
            assert err["param"] == param and "not supported by this server" in err["message"], (param, err)
        for ids in ([True, False], [1.0, 2.0], [[True]]):  # were read as token ids 1, 0, 1, 2...
            err = _openai_error(client.post("/v1/completions", json={"prompt": ids, "max_tokens": 2}), 400)
            assert err["param"].startswith("prompt"), err
        # their neutral values are fine (clients send them by default)
        neutral = {"logit_bias": {}, "tool_choice": "none", "response_format": {"type": "text"}, "tools": []}
        assert client.post("/v1/chat/completions", json={**chat, **neutral}).status_code == 200
        tools = [{"type": "function", "function": {"name": "f"}}]  # offered, but the model may not call them
        assert (
            client.post("/v1/chat/completions", json={**chat, "tools": tools, "tool_choice": "none"}).status_code == 200
        )
        plain = {"prompt": "x", "max_tokens": 2, "best_of": 1, "suffix": None, "logit_bias": None}
        assert client.post("/v1/completions", json=plain).status_code == 200


def test_prompt_too_long_is_400_unless_truncation_is_asked(gpt2_tokenizer: Tokenizer) -> None:
    long_prompt = "word " * 100  # 100 tokens > the 64-token context
    with serving(gpt2_tokenizer, settings=SETTINGS) as client:
        err = _flat_error(client.post("/generate/custom", json={"prompt": long_prompt}), 400)
        assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
        oa = _openai_error(client.post("/v1/completions", json={"prompt": long_prompt}), 400)
        assert oa["code"] == "context_length_exceeded"
        ok = client.post("/generate/custom", json={"prompt": long_prompt, "truncate_prompt": True, "max_new_tokens": 4})
        assert ok.status_code == 200 and ok.json()["generated_text"].startswith(long_prompt)
        usage = client.post("/v1/completions", json={"prompt": long_prompt, "truncate_prompt": True}).json()["usage"]
        assert usage["prompt_tokens"] < 64


def test_unknown_model_route_method_and_limits(gpt2_tokenizer: Tokenizer) -> None:
    with serving(gpt2_tokenizer, settings=SETTINGS.replace(max_new_tokens_cap=10)) as client:
        err = _openai_error(client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert err["type"] == "invalid_request_error"  # OpenAI's type for it (its SDK raises NotFoundError by status)
        assert _flat_error(client.get("/nope"), 404)["type"] == "not_found_error"
        assert _openai_error(client.get("/v1/nope"), 404)["type"] == "invalid_request_error"
        _flat_error(client.get("/generate/custom"), 405)
        cap = client.post("/generate/custom", json={"prompt": "x", "max_new_tokens": 11})
        assert _flat_error(cap, 400)["param"] == "max_new_tokens"
        ids = client.post("/v1/completions", json={"prompt": [1, 99999]})
        assert _openai_error(ids, 400)["param"] == "prompt"
        batch = client.post("/v1/completions", json={"prompt": ["a"] * 4, "n": 8})
        assert _openai_error(batch, 400)["param"] == "n"


def test_engine_errors_map_to_statuses() -> None:
    assert to_api_error(QueueFullError("full")).status == 429
    assert to_api_error(QueueFullError("full")).headers == {"Retry-After": "1"}
    assert to_api_error(PromptTooLongError("long")).param == "prompt"
    sampling = to_api_error(SamplingError("top_p must be in (0, 1], got 2"))
    assert (sampling.status, sampling.param) == (400, "top_p")


# --- backpressure and deadlines ----------------------------------------------------------------------------------


def _in_thread(fn) -> tuple[threading.Thread, list]:  # noqa: ANN001
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _wait_until(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_full_queue_answers_429_with_retry_after(gpt2_tokenizer: Tokenizer) -> None:
    gate = threading.Event()  # held: nothing leaves the queue until the gate opens
    settings = SETTINGS.replace(slots=1, max_queue=1)
    with serving(gpt2_tokenizer, settings=settings, engine_factory=held_engine(gate)) as client:
        worker = client.app.state.workers["custom"]
        waiting: list[tuple[threading.Thread, list]] = []
        rejected = None
        try:
            for i in range(8):  # fill the queue (its exact size is the engine's business) until one bounces
                t, out = _in_thread(lambda: client.post("/generate/custom", json={"prompt": "a", "max_new_tokens": 2}))
                _wait_until(lambda i=i, t=t: worker.queue_depth == i + 1 or not t.is_alive())
                if not t.is_alive():
                    rejected = out[0]
                    break
                waiting.append((t, out))
            assert rejected is not None and waiting
            assert _flat_error(rejected, 429)["code"] == "queue_full" and rejected.headers["retry-after"] == "1"
            _openai_error(client.post("/v1/completions", json={"prompt": "c"}), 429)
        finally:
            gate.set()
        for t, out in waiting:
            t.join(5)
            assert out[0].status_code == 200


def test_more_choices_than_the_server_ever_holds_is_400_not_429(gpt2_tokenizer: Tokenizer) -> None:
    """A 429 says "retry later", and SDKs do, forever: 4 choices never fit 1 slot and a queue of 1."""
    settings = SETTINGS.replace(slots=1, max_queue=1)
    with serving(gpt2_tokenizer, settings=settings) as client:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for path, body in (
            ("/v1/completions", {"prompt": "a", "max_tokens": 2, "n": 4}),
            ("/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 2}),
            ("/v1/chat/completions", {**chat, "n": 3}),
        ):
            err = _openai_error(client.post(path, json=body), 400)
            assert err["param"] == "n" and "1 slots + a queue of 1" in err["message"], err
            assert "ask for at most 2" in err["message"]
        ok = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_deadline_while_queued_is_503_and_frees_the_queue(gpt2_tokenizer: Tokenizer) -> None:
    gate = threading.Event()
    settings = SETTINGS.replace(request_timeout_s=0.3)
    with serving(gpt2_tokenizer, settings=settings, engine_factory=held_engine(gate)) as client:
        try:
            r = client.post("/generate/custom", json={"prompt": "a"})
            err = _flat_error(r, 503)
            assert err["code"] == "timeout" and "retry-after" in r.headers
            assert client.app.state.workers["custom"].queue_depth == 0
            # it never ran: no prompt tokens read, no generation timed (they were counted as if it had)
            _wait_until(lambda: 'tinyllm_generated_tokens_total{model="custom"}' in client.get("/metrics").text)
            text = client.get("/metrics").text
            for series in (
                'tinyllm_prompt_tokens_total{model="custom"}',
                'tinyllm_generation_seconds_count{model="custom"}',
            ):
                assert f"{series} 0.0" in text or series not in text, text  # (a series never touched is absent)
        finally:
            gate.set()


def test_deadline_mid_generation_returns_what_is_there(gpt2_tokenizer: Tokenizer) -> None:
    settings = SETTINGS.replace(request_timeout_s=0.5)
    with serving(gpt2_tokenizer, settings=settings, engine_factory=slow_engine(0.05)) as client:
        start = time.monotonic()
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 60})
        assert time.monotonic() - start < 2.0
        body = r.json()
        assert r.status_code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert 1 <= body["usage"]["completion_tokens"] < 30
        assert client.app.state.workers["custom"].active_slots == 0


# --- bugs --------------------------------------------------------------------------------------------------------


class _BrokenEngine(Engine):
    def submit(self, request, *, on_event=None):  # noqa: ANN001, ANN201
        raise RuntimeError("secret internals /etc/passwd")


def test_a_bug_is_a_generic_500_and_a_log_line(gpt2_tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    def broken(loaded: LoadedModel, settings: ServerSettings) -> Engine:
        return _BrokenEngine(loaded.model, tokenizer=loaded.tokenizer)

    with serving(gpt2_tokenizer, settings=SETTINGS, engine_factory=broken) as client, caplog.at_level(logging.ERROR):
        r = client.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-ID": "bug-1"})
        err = _openai_error(r, 500)
        assert err["type"] == "server_error" and "secret" not in r.text and "Traceback" not in r.text
        assert r.headers["x-request-id"] == "bug-1"
        flat = _flat_error(client.post("/generate/custom", json={"prompt": "x"}), 500)
        assert "secret" not in flat["detail"]
    assert any("bug-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)


# --- host names ----------------------------------------------------------------------------------------------------


def test_a_loopback_server_answers_only_to_loopback_host_names(gpt2_tokenizer: Tokenizer) -> None:
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and is then same-origin with us."""
    from tinyllm.server.middleware import host_name

    assert [host_name(h) for h in ("LocalHost:5000", "[::1]:5000", "::1", "127.0.0.1")] == [
        "localhost",
        "::1",
        "::1",
        "127.0.0.1",
    ]
    body = {"prompt": "Hi", "max_new_tokens": 1}
    with serving(gpt2_tokenizer) as client:
        for host in ("localhost:5000", "127.0.0.1:5000", "[::1]:5000", "LOCALHOST"):
            assert client.post("/generate/custom", json=body, headers={"host": host}).status_code == 200, host
        for path in ("/generate/custom", "/v1/completions", "/health"):
            r = client.post(path, json=body, headers={"host": "evil.example:5000"})
            err = _openai_error(r, 400) if path.startswith("/v1") else _flat_error(r, 400)
            assert err["code"] == "invalid_host"
            assert "'evil.example'" in r.text and "TINYLLM_ALLOWED_HOSTS" in r.text
    named = ServerSettings(checkpoint=None, gpt2=None, slots=1, allowed_hosts=("*.example.com", "Box"))
    with serving(gpt2_tokenizer, settings=named) as client:
        # loopback names always pass (the Docker image's HEALTHCHECK asks 127.0.0.1 whatever the names are)
        hosts = {"api.example.com": 200, "box:80": 200, "example.org": 400, "localhost": 200, "127.0.0.1:5000": 200}
        for host, status in hosts.items():
            assert client.get("/health", headers={"host": host}).status_code == status, host
    everyone = ServerSettings(checkpoint=None, gpt2=None, slots=1, host="0.0.0.0")  # the Docker image's bind
    with serving(gpt2_tokenizer, settings=everyone) as client:
        assert client.get("/health", headers={"host": "my-box.lan:5000"}).status_code == 200
    assert ServerSettings.from_env({"TINYLLM_ALLOWED_HOSTS": "a.lan, B.lan"}).allowed_hosts == ("a.lan", "b.lan")
    with pytest.raises(SettingsError, match="allowed_hosts is empty"):
        ServerSettings(allowed_hosts=(" ",))


# --- what clients cut short ---------------------------------------------------------------------------------------


def test_a_client_gone_before_its_body_arrived_is_a_499_and_methods_are_bounded_labels() -> None:
    """A client that closed mid-upload was logged and counted as a 500 (false alerts); every method token a
    client made up ("FOO0") was a new metrics series."""
    import asyncio

    from tinyllm.server.metrics import Metrics
    from tinyllm.server.middleware import BodyLimitMiddleware, RequestContextMiddleware

    async def never_called(scope, receive, send):  # noqa: ANN001, ANN202
        pytest.fail("the app ran without its body")

    async def answer_405(scope, receive, send):  # noqa: ANN001, ANN202
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    metrics = Metrics()
    cut = RequestContextMiddleware(BodyLimitMiddleware(never_called, max_bytes=1000), metrics=metrics)
    odd = RequestContextMiddleware(answer_405, metrics=metrics)
    messages = iter([{"type": "http.request", "body": b'{"prompt": ', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():  # noqa: ANN202
        return next(messages)

    async def send(message):  # noqa: ANN001, ANN202
        pytest.fail(f"sent {message} to a client that is gone")

    async def main() -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"100")]
        await cut({"type": "http", "method": "POST", "path": "/generate/custom", "headers": headers}, receive, send)
        for method in ("FOO0", "get", "PATCH"):
            await odd({"type": "http", "method": method, "path": "/health", "headers": []}, receive, lambda m: _noop())

    async def _noop() -> None:
        return None

    asyncio.run(main())
    text = metrics.render().decode()
    assert 'tinyllm_http_requests_total{method="POST",route="unmatched",status="499"} 1.0' in text
    assert 'status="500"' not in text
    assert 'method="other",route="unmatched",status="405"} 2.0' in text and 'method="PATCH"' in text
    assert "FOO0" not in text and 'method="get"' not in text
