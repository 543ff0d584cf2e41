"""Request and response bodies of the seed routes (/generate/*), /tokenize and the operations routes.

Bounds live here (pydantic `Field(ge=, le=)`), so a bad value is a 422 naming the field before any work.
Sampling fields left out (or null) take the server's defaults (`ServerSettings.sampling`).
The OpenAI-compatible bodies are in `schemas_openai.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

MAX_NEW_TOKENS_BOUND = 4096  # the schema's bound; the server's own cap (`max_new_tokens_cap`) may be lower
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**63 - 1
MAX_MODEL_CHARS = 64  # a model id: "custom", "gpt2"; longer ones are a client's mistake, not worth echoing
MAX_TOKENIZE_CHARS = 100_000


def _encodable(text: str) -> str:
    """JSON's \\ud800-style escapes can carry a lone surrogate, which no UTF-8 text (or answer) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {exc.start}") from None
    return text


def null_is_default(default: Any) -> BeforeValidator:
    """OpenAI's API takes null for 'the default' on optional fields; clients that send every field rely on it."""
    return BeforeValidator(lambda value: default if value is None else value)


def _at_most(chars: int) -> AfterValidator:
    """A length bound checked after `_encodable` (pydantic's own max_length turns a lone surrogate's clear
    message into "unable to parse raw data"); pair it with `_schema_max(chars)` for the API's JSON schema."""

    def check(text: str) -> str:
        if len(text) > chars:
            raise ValueError(f"at most {chars} characters, got {len(text)}")
        return text

    return AfterValidator(check)


def _schema_max(chars: int) -> Any:
    return Field(json_schema_extra={"maxLength": chars})


Text = Annotated[str, AfterValidator(_encodable)]
ModelId = Annotated[str, AfterValidator(_encodable), _at_most(MAX_MODEL_CHARS), _schema_max(MAX_MODEL_CHARS)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_encodable)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None


class SamplingFields(BaseModel):
    """Sampling knobs shared by the seed routes (and, as extensions, the OpenAI routes)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_BOUND, description="new tokens to generate (default 64)"
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy (default 0.8)")
    top_k: int | None = Field(None, ge=0, le=100_000, description="keep the k likeliest tokens; 0 = off (default 50)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus mass; 1 = off (default 0.95)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="drop tokens below min_p x the top one (default 0)")
    repetition_penalty: float | None = Field(
        None, ge=0.1, le=10.0, description="divides logits of tokens already seen; 1 = off (default 1.2)"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed for reproducible sampling")
    stop: Stop = Field(None, description="up to 4 strings that end generation (cut from the text)")
    truncate_prompt: bool = Field(
        False,
        description="drop tokens from the prompt's start so that it and the new tokens fit the context (up to half "
        "of it for them); without it, a prompt that does not fit is a 400",
    )


class GenerateRequest(SamplingFields):
    """The seed contract: `{"prompt": "..."}` plus optional sampling fields and `stream`."""

    prompt: Text = Field(..., description="text to continue (an empty prompt starts from <|endoftext|>)")
    stream: bool = Field(False, description="answer with server-sent events of text deltas")

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"examples": [{"prompt": "The future of AI is"}]},
    )


class GenerateResponse(BaseModel):
    """Exactly the seed's answer: the prompt followed by its continuation."""

    generated_text: str


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Annotated[Text, _at_most(MAX_TOKENIZE_CHARS), _schema_max(MAX_TOKENIZE_CHARS)] = Field(
        ..., description="text to split into tokens"
    )
    model: ModelId | None = Field(
        None, description='whose tokenizer: "custom" or "gpt2" (default: your model\'s when loaded, else GPT-2\'s)'
    )


class TokenizeResponse(BaseModel):
    ids: list[int]
    tokens: list[str] = Field(
        ..., description="each token's own text; the bytes of a token holding part of a character as \\xNN escapes"
    )
    model: str | None = Field(..., description="the model whose tokenizer split the text (null: GPT-2's BPE)")
    tokenizer: str = Field(..., description="the tokenizer's name: \"gpt2\", or a trained BPE's")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ModelState(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    state: Literal["loading", "ready", "unavailable", "stopped"]
    error: str | None = None


class ReadyResponse(BaseModel):
    status: Literal["ready", "unavailable"]
    models: dict[str, ModelState]


class ErrorDetail(BaseModel):
    """The error body of the non-/v1 routes."""

    detail: str
    type: str
    param: str | None = None
    code: str | None = None


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the flat error body."""
    return {s: {"model": ErrorDetail} for s in statuses}
