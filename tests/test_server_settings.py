"""ServerSettings: safe defaults, the TINYLLM_* environment, overrides, bounds."""

from __future__ import annotations

import pytest

from tinyllm.server.settings import DEFAULT_GPT2_SOURCE, ServerSettings, SettingsError


def test_defaults_are_private_and_sensible() -> None:
    s = ServerSettings()
    assert (s.host, s.port, s.api_key) == ("127.0.0.1", 5000, None)
    assert s.checkpoint == "runs/default" and s.gpt2 == DEFAULT_GPT2_SOURCE
    assert s.sampling.max_new_tokens == 64 and s.sampling.repetition_penalty > 1.0
    params = s.sampling.params(max_new_tokens=5)  # what `tinyllm compare` and bench_quality sample with
    assert (params.temperature, params.top_k, params.top_p) == (0.8, 50, 0.95)
    assert params.repetition_penalty == 1.2 and params.max_new_tokens == 5 and params.seed is None


def test_from_env_reads_the_five_variables() -> None:
    env = {
        "TINYLLM_HOST": "0.0.0.0",
        "TINYLLM_PORT": "8080",
        "TINYLLM_API_KEY": "secret",
        "TINYLLM_CHECKPOINT": "runs/x",
        "TINYLLM_GPT2": "off",
        "UNRELATED": "1",
    }
    s = ServerSettings.from_env(env)
    assert (s.host, s.port, s.api_key, s.checkpoint, s.gpt2) == ("0.0.0.0", 8080, "secret", "runs/x", None)
    assert ServerSettings.from_env({"TINYLLM_API_KEY": " secret\n"}).api_key == "secret"  # pasted with a newline
    assert ServerSettings(api_key="").api_key is None  # empty: no key
    with pytest.raises(SettingsError, match="only whitespace"):  # not silently no key (the server would be open)
        ServerSettings.from_env({"TINYLLM_API_KEY": "  \n"})
    capacity = {"TINYLLM_SLOTS": "2", "TINYLLM_MAX_QUEUE": "5", "TINYLLM_REQUEST_TIMEOUT_S": "1.5"}
    s = ServerSettings.from_env(capacity | {"TINYLLM_MAX_CONTEXT": "64"})  # settable without code
    assert (s.slots, s.max_queue, s.request_timeout_s, s.max_context) == (2, 5, 1.5, 64)
    with pytest.raises(SettingsError, match="TINYLLM_MAX_CONTEXT must be an integer"):
        ServerSettings.from_env({"TINYLLM_MAX_CONTEXT": "lots"})


def test_the_server_caps_the_context_a_checkpoint_asks_for() -> None:
    """A checkpoint's block_size sizes each slot's KV cache only up to `max_context`."""
    from tinyllm.server import worker

    loaded = worker.LoadedModel(model=_tiny_model(), tokenizer=_ByteTokenizer())
    assert loaded.model.config.block_size == 8
    small = worker.default_engine(loaded, ServerSettings(max_context=4, slots=2))
    assert small.context_limit == 4 and small.cache.k[0].shape[2] == 4
    assert worker.default_engine(loaded, ServerSettings(slots=2)).context_limit == 8  # the default cap: 4096
    assert "context 4 (of its 8: TINYLLM_MAX_CONTEXT), KV cache 0 MiB" in worker._describe(loaded, small)


def test_compile_is_on_from_the_environment_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings().compile is False  # a settings object built in code (tests, embedding) stays eager
    assert ServerSettings.from_env({}).compile is True  # `python app.py` / `make run` compile the decode step
    for off in ("0", "off", "false", "no", ""):
        assert ServerSettings.from_env({"TINYLLM_COMPILE": off}).compile is False
    assert ServerSettings.from_env({"TINYLLM_COMPILE": "on"}, compile=False).compile is False

    from tinyllm.server import worker

    calls = []
    monkeypatch.setattr(worker.Engine, "compile_decode", lambda self, background=False: calls.append(background))
    loaded = worker.LoadedModel(model=_tiny_model(), tokenizer=_ByteTokenizer())
    worker.default_engine(loaded, ServerSettings(compile=True))
    worker.default_engine(loaded, ServerSettings())
    assert calls == [True]  # once, in the background


class _ByteTokenizer:
    eot_token = 0

    def incremental_decoder(self):  # noqa: ANN202
        raise NotImplementedError


def _tiny_model():  # noqa: ANN202
    from tinyllm.config import ModelConfig
    from tinyllm.model import GPT

    return GPT(ModelConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()


def test_overrides_win_over_the_environment() -> None:
    s = ServerSettings.from_env({"TINYLLM_PORT": "8080", "TINYLLM_GPT2": "/models/gpt2"}, port=9000, slots=2)
    assert (s.port, s.gpt2, s.slots) == (9000, "/models/gpt2", 2)


def test_none_overrides_mean_not_given_except_for_models_and_key() -> None:
    s = ServerSettings.from_env({"TINYLLM_PORT": "8080"}, host=None, port=None, gpt2=None, api_key=None)
    assert (s.host, s.port, s.gpt2, s.api_key) == ("127.0.0.1", 8080, None, None)


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINYLLM_API_KEY", "")
    monkeypatch.setenv("TINYLLM_PORT", "5001")
    s = ServerSettings.from_env()
    assert s.api_key is None and s.port == 5001


@pytest.mark.parametrize(
    ("env", "overrides"),
    [
        ({"TINYLLM_PORT": "http"}, {}),
        ({}, {"port": 70000}),
        ({}, {"slots": 0}),
        ({}, {"request_timeout_s": 0}),
        ({"TINYLLM_SLOTS": "many"}, {}),
        ({"TINYLLM_MAX_QUEUE": "0"}, {}),
        ({"TINYLLM_REQUEST_TIMEOUT_S": "soon"}, {}),
    ],
)
def test_bad_values_fail_clearly(env: dict[str, str], overrides: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        ServerSettings.from_env(env, **overrides)


def test_cli_serve_builds_settings_from_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from tinyllm import cli
    from tinyllm.server import app

    seen: list[ServerSettings] = []
    monkeypatch.setattr(app, "serve", lambda settings: seen.append(settings))
    for name in ("TINYLLM_HOST", "TINYLLM_CHECKPOINT", "TINYLLM_GPT2", "TINYLLM_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TINYLLM_API_KEY", "from-env")
    monkeypatch.setenv("TINYLLM_PORT", "6000")
    assert cli.main(["serve", "--no-gpt2", "--checkpoint", "runs/x", "--host", "127.0.0.2"]) == 0
    assert cli.main(["serve", "--gpt2", "/models/gpt2", "--port", "7000", "--api-key", "flag", "--no-compile"]) == 0
    first, second = seen
    assert (first.compile, second.compile) == (True, False)
    assert (first.host, first.port, first.gpt2, first.checkpoint, first.api_key) == (
        "127.0.0.2",
        6000,
        None,
        "runs/x",
        "from-env",
    )
    assert (second.host, second.port, second.gpt2, second.api_key) == ("127.0.0.1", 7000, "/models/gpt2", "flag")
    assert cli.main(["serve", "--checkpoint", "none", "--gpt2", "off"]) == 0  # as the environment variables take it
    assert (seen[2].checkpoint, seen[2].gpt2) == (None, None)


def test_the_device_is_a_gpu_when_there_is_one_and_a_bad_one_fails_before_loading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server used to decode on the CPU whatever the machine had, with no way to choose from the CLI."""
    import torch

    from tinyllm import cli
    from tinyllm.server import app

    monkeypatch.delenv("TINYLLM_DEVICE", raising=False)
    assert ServerSettings().device == "auto" and ServerSettings.from_env({"TINYLLM_DEVICE": ""}).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(ServerSettings().resolved_device()) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert str(ServerSettings().resolved_device()) == "cpu"  # MPS only when asked for
    assert str(ServerSettings.from_env({"TINYLLM_DEVICE": "mps"}).resolved_device()) == "mps"
    with pytest.raises(SettingsError, match="device cuda requested but CUDA is not available here"):
        ServerSettings.from_env({"TINYLLM_DEVICE": "cuda"})
    with pytest.raises(SettingsError, match="unknown device 'gpu'"):
        ServerSettings(device="gpu")

    seen: list[ServerSettings] = []
    monkeypatch.setattr(app, "serve", lambda settings: seen.append(settings))
    assert cli.main(["serve", "--device", "cpu", "--no-gpt2"]) == 0 and seen[0].device == "cpu"
    assert cli.main(["serve", "--device", "cuda:0", "--no-gpt2"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.setenv("TINYLLM_DEVICE", "nonsense")
    assert cli.main(["run", "--run-dir", "/nonexistent/run", "--minutes", "1"]) == 2  # before training, not after
    assert "unknown device 'nonsense'" in capsys.readouterr().err
    assert len(seen) == 1
