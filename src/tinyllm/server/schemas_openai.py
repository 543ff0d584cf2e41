"""OpenAI-compatible bodies: /v1/models, /v1/completions, /v1/chat/completions (requests, responses, chunks).

Requests follow OpenAI's field names and defaults (temperature 1, top_p 1, 16 tokens for completions);
unknown fields are ignored as OpenAI-style servers do, except those that would change the answer and are not
implemented here (`logit_bias`, `suffix`, `best_of`, tools and functions, a JSON `response_format`): a request
that uses one gets a 400 naming it rather than an answer that silently ignored it. Extensions in vLLM's style:
`top_k`, `min_p`, `repetition_penalty`, `truncate_prompt`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from tinyllm.sampling import MAX_TOP_LOGPROBS
from tinyllm.server.schemas import MAX_NEW_TOKENS_BOUND, MAX_SEED, ModelId, Stop, Text, null_is_default

MAX_N = 8
MAX_PROMPTS = 16


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorBody


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse} for s in statuses}


# --- models ------------------------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tinyllm"
    ready: bool = Field(..., description="whether the model answers now (else see `state` and `error`)")
    state: str
    error: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- shared request fields -------------------------------------------------------------------------------------


def _unsupported(what: str, *, allowed: tuple[Any, ...] = (None,)) -> Any:
    """A field OpenAI defines that this server does not implement: any value but `allowed` (or an empty one) is
    refused, so a client never takes an answer for one that honoured it."""

    def check(value: Any) -> Any:
        if value in allowed or value == {} or value == [] or value == "":
            return value
        raise ValueError(f"{what} is not supported by this server; leave it out")

    return Annotated[Any, AfterValidator(check)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Annotated[ModelId, null_is_default("custom")] = Field("custom", description='"custom" or "gpt2"')
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, ge=0.0, le=1.0, description="nucleus mass; 0 (as OpenAI allows) is greedy")
    n: Annotated[int, null_is_default(1)] = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    # strict, as OpenAI's: "stream": "yes" or "logprobs": true are errors, not a stream and 1 log-probability
    stream: Annotated[StrictBool, null_is_default(False)] = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    user: Text | None = None
    logit_bias: _unsupported("logit_bias") = None  # type: ignore[valid-type]
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0, le=100_000, description="extension: keep the k likeliest tokens")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="extension: min-p filter")
    repetition_penalty: float | None = Field(None, ge=0.1, le=10.0, description="extension: CTRL-style penalty")
    truncate_prompt: Annotated[bool, null_is_default(False)] = Field(
        False, description="extension: left-truncate a prompt so that it and max_tokens fit (up to half the context)"
    )


# --- completions -------------------------------------------------------------------------------------------------

TokenIds = Annotated[list[Annotated[int, Field(ge=0, strict=True)]], Field(min_length=1)]  # true or 1.0 is no id
Prompt = Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
PromptOrBatch = Prompt | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]


class CompletionRequest(_OpenAIRequest):
    prompt: PromptOrBatch = Field(..., description="a string, a list of strings, token ids, or lists of token ids")
    max_tokens: int | None = Field(16, ge=1, le=MAX_NEW_TOKENS_BOUND)
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="log-probabilities of each token and the top N")
    echo: Annotated[StrictBool, null_is_default(False)] = Field(False, description="prepend the prompt to the text")
    suffix: _unsupported("suffix (insertion)") = None  # type: ignore[valid-type]
    best_of: _unsupported("best_of (use n)", allowed=(None, 1)) = None  # type: ignore[valid-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (with `usage` null except in the usage chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# --- chat --------------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_BOUND, description="default: the server's 64")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS_BOUND, description="alias of max_tokens")
    logprobs: Annotated[StrictBool, null_is_default(False)] = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tool_choice: _unsupported("tool calling", allowed=(None, "none", "auto")) = None  # type: ignore[valid-type]
    tools: Any = None  # refused unless tool_choice is "none" (the model may not call them: nothing to implement)
    functions: _unsupported("function calling") = None  # type: ignore[valid-type]
    function_call: _unsupported("function calling", allowed=(None, "none", "auto")) = None  # type: ignore[valid-type]
    response_format: _unsupported(  # type: ignore[valid-type]
        "response_format other than text (JSON mode, structured outputs)", allowed=(None, {"type": "text"})
    ) = None

    @field_validator("tools")
    @classmethod
    def _no_tool_calls(cls, value: Any, info: ValidationInfo) -> Any:
        if value in (None, [], {}) or info.data.get("tool_choice") == "none":
            return value
        raise ValueError("tool calling is not supported by this server; leave it out (or send tool_choice 'none')")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
