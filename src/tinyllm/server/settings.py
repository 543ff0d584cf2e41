"""The server's configuration: one frozen dataclass, read from the environment only in `from_env`.

Besides cli.py this is the only place that reads the environment: TINYLLM_HOST, TINYLLM_PORT,
TINYLLM_API_KEY, TINYLLM_CHECKPOINT, TINYLLM_GPT2 (set it to "", "0", "none" or "off" to disable GPT-2) and
TINYLLM_COMPILE (on unless set to one of those: compile the batch-1 decode step in the background), and the
capacity: TINYLLM_SLOTS (sequences decoded together, 8), TINYLLM_MAX_QUEUE (requests waiting beyond them, 64;
more get 429), TINYLLM_REQUEST_TIMEOUT_S (300) and TINYLLM_MAX_CONTEXT (4096); TINYLLM_ALLOWED_HOSTS (names
the server answers to, comma-separated).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tinyllm.errors import TinyLLMError

if TYPE_CHECKING:
    import torch

    from tinyllm.sampling import SamplingParams

DEFAULT_GPT2_SOURCE = "openai-community/gpt2"
DEFAULT_RUN_DIR = "runs/default"
_OFF = {"", "0", "none", "off", "false", "no"}
_NULLABLE = {"checkpoint", "gpt2", "api_key"}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # a server bound to one answers only to these names by default


class SettingsError(TinyLLMError):
    """A server setting is out of range or an environment variable cannot be parsed."""


@dataclass(frozen=True)
class SamplingDefaults:
    """What a bare `{"prompt": ...}` on the seed routes gets.

    Chosen for small models, whose failure mode is a loop ("The future of AI is is is is is"): a cooled
    distribution cut to the 50 likeliest tokens and a 95% nucleus, plus a CTRL-style repetition penalty of
    1.2 that divides the logits of tokens already seen. The OpenAI routes keep OpenAI's own defaults
    (temperature 1, top_p 1, 16 tokens) so existing clients behave as they expect.
    """

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.2

    def params(self, **overrides: Any) -> SamplingParams:
        """These defaults as `SamplingParams` (what `tinyllm compare` and the benchmarks sample with)."""
        from tinyllm.sampling import SamplingParams

        return SamplingParams(**{**dataclasses.asdict(self), **overrides})


@dataclass(frozen=True)
class ServerSettings:
    """Everything `create_app` needs; defaults are safe for a laptop (loopback only, no key).

    Attributes:
        host: interface to bind; 127.0.0.1 keeps the server private to this machine.
        port: TCP port.
        checkpoint: a checkpoint directory or a run directory holding best/ or last/; None disables the
            custom model.
        gpt2: a Hugging Face hub id or a local GPT-2 directory; None disables the GPT-2 model.
        api_key: when set, every route except /health, the web page and the API docs needs
            `Authorization: Bearer <api_key>`.
        max_queue: requests waiting for a slot, per model; beyond it the server answers 429.
        slots: sequences decoded together per model (the continuous batch).
        max_body_bytes: largest request body; larger ones get 413.
        request_timeout_s: deadline of one generation; see `tinyllm.server.generation` for what happens at it.
        max_new_tokens_cap: the most new tokens one request may ask for.
        max_context: the most positions (prompt plus new tokens) a sequence may hold, whatever the checkpoint's
            block_size says: each slot's KV cache is sized by the smaller of the two, so a checkpoint from
            elsewhere cannot make the server reserve memory for a context nobody asked for.
        device: torch device for the models: "auto" (a CUDA GPU when there is one, else the CPU; Apple's MPS
            only when asked for, as the serving path is untested there), "cpu", "cuda", "cuda:N" or "mps".
        load_wait_s: how long startup waits for the models; slower ones keep loading in the background
            (their routes answer 503 "loading" meanwhile).
        torch_threads: torch's intra-op threads while serving. None: one fewer than the CPU cores (at least
            1), so the event loop and the HTTP work keep a core: with every core given to torch, its threads
            wait on each other whenever one is descheduled (measured here on 2 cores: 1 thread decodes
            several times faster than 2 under load). 0 leaves torch's own choice.
        compile: build each model's batch-1 decode step after loading, in the background (CPU: for float32
            models the C step, `tinyllm.fused_decode`, with a C compiler; else inductor's, `tinyllm.compiled_decode`,
            with a C++ compiler and torch's headers): a lone request then decodes ~1.4-2x faster; until it is
            ready, or where it cannot be built, decoding is eager. Off by default here; `from_env` turns it on
            unless TINYLLM_COMPILE is off.
        allowed_hosts: the host names requests may be addressed to (their Host header; "*.example.com" covers a
            domain's names, "*" any name). None: the loopback names when the server binds a loopback address, so
            a web page cannot reach it through a name re-pointed at 127.0.0.1 (DNS rebinding), else any name.
        sampling: defaults of the seed routes.
    """

    host: str = "127.0.0.1"
    port: int = 5000
    checkpoint: str | None = DEFAULT_RUN_DIR
    gpt2: str | None = DEFAULT_GPT2_SOURCE
    api_key: str | None = None
    max_queue: int = 64
    slots: int = 8
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 300.0
    max_new_tokens_cap: int = 1024
    max_context: int = 4096
    device: str = "auto"
    load_wait_s: float = 5.0
    torch_threads: int | None = None
    compile: bool = False
    allowed_hosts: tuple[str, ...] | None = None
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be in 0..65535, got {self.port}")
        for name in ("max_queue", "slots", "max_body_bytes", "max_new_tokens_cap", "max_context"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 0:
            raise SettingsError(f"torch_threads must be >= 0 (0: torch's choice), got {self.torch_threads}")
        if self.allowed_hosts is not None:
            names = tuple(name.strip().lower() for name in self.allowed_hosts if name.strip())
            if not names:
                raise SettingsError("allowed_hosts is empty: name at least one host, or '*' for any")
            object.__setattr__(self, "allowed_hosts", names)
        if self.request_timeout_s <= 0:
            raise SettingsError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.api_key is not None:  # a key pasted with a newline or spaces is the key without them
            if self.api_key and not self.api_key.strip():  # not "no key": that would serve without one
                raise SettingsError("the API key is only whitespace; give a key, or leave it unset for none")
            object.__setattr__(self, "api_key", self.api_key.strip() or None)
        self.resolved_device()  # an unknown device, or one this machine lacks: an error now, not at load

    def resolved_device(self) -> torch.device:
        """The device the models load on (`device` with "auto" resolved)."""
        from tinyllm.devices import DeviceError, detect_device

        try:
            return detect_device(self.device, prefer=("cuda",))
        except DeviceError as exc:
            raise SettingsError(str(exc)) from None

    def resolved_allowed_hosts(self) -> tuple[str, ...]:
        """The host names requests may name (see `allowed_hosts`); ("*",) means any."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if self.host in LOOPBACK_HOSTS:
            return LOOPBACK_HOSTS
        return ("*",)

    def resolved_torch_threads(self) -> int | None:
        """The intra-op thread count to set, or None to leave torch alone."""
        if self.torch_threads == 0:
            return None
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, (os.cpu_count() or 2) - 1)

    def replace(self, **changes: Any) -> ServerSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerSettings:
        """Settings from TINYLLM_* environment variables; keyword overrides win over the environment.

        Args:
            env: the environment to read (default `os.environ`).
            **overrides: any field of `ServerSettings`. None means "not given" for fields that cannot be None
                (host, port, ...), so a CLI can pass its unset options straight through; for checkpoint,
                gpt2 and api_key None means "off".

        Raises:
            SettingsError: TINYLLM_PORT is not an integer, or a value is out of range.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if "TINYLLM_HOST" in env:
            values["host"] = env["TINYLLM_HOST"]
        numbers = {"PORT": ("port", int), "SLOTS": ("slots", int), "MAX_QUEUE": ("max_queue", int)}
        numbers["MAX_CONTEXT"] = ("max_context", int)
        numbers["REQUEST_TIMEOUT_S"] = ("request_timeout_s", float)
        for suffix, (name, kind) in numbers.items():
            if f"TINYLLM_{suffix}" in env:
                raw = env[f"TINYLLM_{suffix}"]
                try:
                    values[name] = kind(raw)
                except ValueError as exc:
                    what = "an integer" if kind is int else "a number"
                    raise SettingsError(f"TINYLLM_{suffix} must be {what}, got {raw!r}") from exc
        if "TINYLLM_API_KEY" in env:
            values["api_key"] = env["TINYLLM_API_KEY"] or None
        if "TINYLLM_CHECKPOINT" in env:
            values["checkpoint"] = optional_source(env["TINYLLM_CHECKPOINT"])
        if "TINYLLM_ALLOWED_HOSTS" in env:
            values["allowed_hosts"] = tuple(env["TINYLLM_ALLOWED_HOSTS"].split(","))
        if "TINYLLM_DEVICE" in env:
            values["device"] = env["TINYLLM_DEVICE"].strip() or "auto"
        if "TINYLLM_GPT2" in env:
            values["gpt2"] = optional_source(env["TINYLLM_GPT2"])
        values["compile"] = env.get("TINYLLM_COMPILE", "on").strip().lower() not in _OFF
        values.update({k: v for k, v in overrides.items() if v is not None or k in _NULLABLE})
        return cls(**values)


def optional_source(value: str) -> str | None:
    """A model source as given, or None for the words that switch it off ("", "0", "none", "off", ...)."""
    return None if value.strip().lower() in _OFF else value
