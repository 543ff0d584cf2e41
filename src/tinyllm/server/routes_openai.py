"""OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

The official `openai` SDK works unchanged against them (base_url `http://host:port/v1`). Model ids are
"custom" (your checkpoint) and "gpt2". Differences from OpenAI, by design:
- defaults are OpenAI's (temperature 1, top_p 1, 16 completion tokens); chat defaults to the server's 64
  new tokens; extensions `top_k`, `min_p`, `repetition_penalty`, `truncate_prompt` are accepted;
- chat uses the plain-text template of `chat.py` (the models are base models);
- log-probabilities are the model's own distribution (before temperature and filters), as vLLM reports them;
  with `echo`, prompt tokens are listed with null log-probabilities;
- with `n` > 1 and a `seed`, choice i samples with seed + i, so choices differ yet repeat across calls.
Streams send one chunk per engine step that produced text or log-probabilities (so a page can show each
token with its top alternatives), a final chunk with `finish_reason`, an optional usage chunk
(`stream_options.include_usage`), then `data: [DONE]`.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request

from tinyllm.engine import Request as EngineRequest
from tinyllm.engine import TokenLogprob
from tinyllm.errors import TinyLLMError
from tinyllm.sampling import SamplingParams
from tinyllm.server.chat import merge_stop, render_chat
from tinyllm.server.errors import APIError, error_body, to_api_error
from tinyllm.server.generation import SSE_DONE, Choice, EventStream, GenerationGroup, sse
from tinyllm.server.schemas_openai import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    openai_error_responses,
)
from tinyllm.server.service import check_max_tokens, encode, sampling_params, settings_of, start_group, worker_for
from tinyllm.server.worker import ModelWorker
from tinyllm.tokenizer import Tokenizer

router = APIRouter(prefix="/v1", tags=["openai"])

_ERRORS = openai_error_responses(400, 401, 404, 413, 415, 422, 429, 503)
_STREAM_DOC = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when `stream` is true"}}


def _card(request: Request, worker: ModelWorker) -> dict[str, Any]:
    created = request.app.state.started
    return {**worker.describe(), "object": "model", "created": created, "owned_by": "tinyllm", "ready": worker.ready}


@router.get("/models", response_model=ModelList, summary="The models this server offers", responses=_ERRORS)
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(request, w) for w in request.app.state.workers.values()]}


@router.get("/models/{model}", response_model=ModelCard, summary="One model (404 for an unknown id)", responses=_ERRORS)
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    return _card(request, worker_for(request, model))


# --- shared ------------------------------------------------------------------------------------------------------


def _params(body: Any, *, max_tokens: int, stop: Sequence[str], logprobs: bool, top_logprobs: int) -> SamplingParams:
    """OpenAI's defaults for whatever the body leaves out (no top-k, no repetition penalty)."""
    return sampling_params(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        stop=tuple(stop),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def _requests(prompts: Sequence[list[int]], params: SamplingParams, *, n: int, truncate: bool) -> list[EngineRequest]:
    """n requests per prompt (choice index = prompt index * n + j); seeds seed + j keep choices distinct."""
    out = []
    for ids in prompts:
        for j in range(n):
            p = params if params.seed is None or j == 0 else params.replace(seed=(params.seed + j) % 2**63)
            out.append(EngineRequest(prompt=ids, params=p, truncate=truncate))
    return out


def _usage(group: GenerationGroup, n: int) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in group.choices if c.index % n == 0)  # each prompt counted once
    completion = group.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_stream_options(body: Any) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError("stream_options is only allowed when stream is true", param="stream_options")


def _check_batch(request: Request, prompts: int, n: int) -> None:
    """At most MAX_PROMPTS choices, and no more than the server could ever hold at once (its slots and queue):
    such a request would get 429 "retry later" forever."""
    choices, settings = prompts * n, settings_of(request)
    if choices > MAX_PROMPTS:
        raise APIError(
            f"{prompts} prompt(s) x n={n} is {choices} choices; at most {MAX_PROMPTS} per request",
            param="n",
            code="invalid_value",
        )
    if choices > (capacity := settings.slots + settings.max_queue):
        raise APIError(
            f"{prompts} prompt(s) x n={n} is {choices} choices, more than this server ever holds at once "
            f"({settings.slots} slots + a queue of {settings.max_queue}: TINYLLM_SLOTS, TINYLLM_MAX_QUEUE); "
            f"ask for at most {capacity}",
            param="n",
            code="invalid_value",
        )


async def _stream_with_errors(chunks: AsyncIterator[str], path: str) -> AsyncIterator[bytes]:
    """SSE framing: each JSON chunk as an event, an error after the headers in-band, then [DONE]."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except TinyLLMError as exc:
        error = to_api_error(exc)
        yield sse(json.dumps(error_body(path, message=error.message, type=error.type, code=error.code)))
    yield SSE_DONE


# --- completions -------------------------------------------------------------------------------------------------


async def _prompt_ids(body: CompletionRequest, tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt, whichever of OpenAI's four prompt forms the body uses."""
    p = body.prompt
    if isinstance(p, str):
        return [(p, await encode(tokenizer, p))]
    if all(isinstance(x, str) for x in p):
        return [(text, await encode(tokenizer, text)) for text in p]  # type: ignore[misc]
    batch = [list(p)] if all(isinstance(x, int) for x in p) else [list(ids) for ids in p]  # type: ignore[arg-type]
    out = []
    for ids in batch:
        bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(f"prompt token ids must be in [0, {tokenizer.vocab_size}); got {bad[:5]}", param="prompt")
        out.append((tokenizer.decode(ids), ids))
    return out


class _TextOffsets:
    """Where each token's text starts in a choice's text, in characters: the text decoded before it. A token
    that ends inside a character adds nothing until the character's last byte arrives (so the text at a
    token's offset starts with the character its bytes belong to)."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as the text's decoder
        self.at = start

    def take(self, token: int) -> int:
        raw = self._tokenizer.token_bytes(token)
        at = self.at
        if self._utf8.getstate()[0] and raw and not 0x80 <= raw[0] <= 0xBF:
            at += 1  # an earlier token's character never finished: its U+FFFD, which this token's text begins with
        self.at += len(self._utf8.decode(raw))
        return at


def _completion_logprobs(
    tokenizer: Tokenizer,
    logprobs: Sequence[TokenLogprob],
    offsets: _TextOffsets,
    *,
    prompt_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs (dicts), text_offset."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    echoed = _TextOffsets(tokenizer)  # the prompt starts the text
    for token in prompt_ids:  # echoed prompt tokens: no log-probabilities computed
        out["tokens"].append(_token_text(tokenizer, token))
        out["token_logprobs"].append(None)
        out["top_logprobs"].append(None)
        out["text_offset"].append(echoed.take(token))
    for lp in logprobs:
        out["tokens"].append(_token_text(tokenizer, lp.token_id))
        out["token_logprobs"].append(lp.logprob)
        top = {_token_text(tokenizer, t): v for t, v in lp.top}
        top.setdefault(_token_text(tokenizer, lp.token_id), lp.logprob)  # as OpenAI: the sampled token is always in
        out["top_logprobs"].append(top)
        out["text_offset"].append(offsets.take(lp.token_id))
    return out


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's text; one holding part of a UTF-8 character in OpenAI's form, "bytes:\\xe6\\x97", so that
    such tokens stay distinct (as U+FFFD they collided as keys of top_logprobs)."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + raw.decode("utf-8", errors="backslashreplace")


@router.post(
    "/completions",
    response_model=CompletionResponse,
    summary="Complete prompts (OpenAI legacy completions)",
    responses={**_STREAM_DOC, **_ERRORS},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    worker = worker_for(request, body.model)
    _check_stream_options(body)
    _, loaded = worker.require()
    tokenizer = loaded.tokenizer
    prompts = await _prompt_ids(body, tokenizer)
    _check_batch(request, len(prompts), body.n)
    max_tokens = check_max_tokens(settings_of(request), body.max_tokens or 16, param="max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    want_lp = body.logprobs is not None
    params = _params(body, max_tokens=max_tokens, stop=stop, logprobs=want_lp, top_logprobs=body.logprobs or 0)
    requests = _requests([ids for _, ids in prompts], params, n=body.n, truncate=body.truncate_prompt)
    if body.echo and body.truncate_prompt:  # echo what the model read: a prompt cut to fit loses its start
        engine = worker.engine
        assert engine is not None  # loaded (`require`)
        for i in range(len(prompts)):
            kept, dropped = engine.check_prompt(requests[i * body.n])
            if dropped:
                prompts[i] = (tokenizer.decode(kept), kept)
    group = start_group(request, worker, requests)
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream and body.stream_options is not None and body.stream_options.include_usage:
        meta["usage"] = None  # as OpenAI: every chunk has the field, null until the last one
    if body.stream:
        first = await group.first_event()
        chunks = _completion_chunks(group, first, body, prompts, tokenizer, meta)
        return EventStream(_stream_with_errors(chunks, request.url.path), group=group)
    choices = []
    for choice in await group.run():
        prompt_text, prompt_ids = prompts[choice.index // body.n]
        logprobs = None
        if want_lp:
            echoed = prompt_ids if body.echo else ()
            offsets = _TextOffsets(tokenizer, len(prompt_text) if body.echo else 0)
            logprobs = _completion_logprobs(tokenizer, choice.logprobs, offsets, prompt_ids=echoed)
        text = prompt_text + choice.text if body.echo else choice.text
        choices.append(
            {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
        )
    return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(group, body.n)}


async def _completion_chunks(
    group: GenerationGroup,
    first: Any,
    body: CompletionRequest,
    prompts: list[tuple[str, list[int]]],
    tokenizer: Tokenizer,
    meta: dict[str, Any],
) -> AsyncIterator[str]:
    offsets = [_TextOffsets(tokenizer) for _ in group.choices]  # text_offset per choice

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return json.dumps({**meta, "object": "text_completion", "choices": [choice]})

    if body.echo:
        for c in group.choices:
            prompt_text, prompt_ids = prompts[c.index // body.n]
            offsets[c.index].at = len(prompt_text)
            echoed = None  # as the whole answer lists them: the prompt's tokens, without log-probabilities
            if body.logprobs is not None:
                echoed = _completion_logprobs(tokenizer, (), _TextOffsets(tokenizer), prompt_ids=prompt_ids)
            yield chunk(c.index, prompt_text, echoed, None)

    def from_event(index: int, event: Any) -> str | None:
        choice: Choice = group.choices[index]
        finish = choice.finish_reason if event.finish_reason is not None else None
        logprobs = None
        if body.logprobs is not None and event.logprobs:
            logprobs = _completion_logprobs(tokenizer, event.logprobs, offsets[index])
        if not event.text and logprobs is None and finish is None:
            return None
        return chunk(index, event.text, logprobs, finish)

    pending = [first] if first is not None else []
    async for tagged in _chain(pending, group):
        out = from_event(*tagged)
        if out is not None:
            yield out
    if body.stream_options is not None and body.stream_options.include_usage:
        yield json.dumps({**meta, "object": "text_completion", "choices": [], "usage": _usage(group, body.n)})


async def _chain(first: list[Any], group: GenerationGroup) -> AsyncIterator[Any]:
    for item in first:
        yield item
    async for item in group.events():
        yield item


# --- chat --------------------------------------------------------------------------------------------------------


def _chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
        ]
    }


def _chat_setup(body: ChatCompletionRequest, request: Request) -> tuple[ModelWorker, SamplingParams, str]:
    worker = worker_for(request, body.model)
    _check_stream_options(body)
    if body.top_logprobs and not body.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
    settings = settings_of(request)
    max_tokens = body.max_completion_tokens or body.max_tokens or settings.sampling.max_new_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    check_max_tokens(settings, max_tokens, param=param)
    top = (body.top_logprobs or 0) if body.logprobs else 0
    params = _params(body, max_tokens=max_tokens, stop=merge_stop(body.stop), logprobs=body.logprobs, top_logprobs=top)
    return worker, params, render_chat(body.messages)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    summary="Chat (OpenAI chat completions, with a plain-text template for base models)",
    responses={**_STREAM_DOC, **_ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    worker, params, prompt = _chat_setup(body, request)
    _, loaded = worker.require()
    tokenizer = loaded.tokenizer
    ids = await encode(tokenizer, prompt)
    _check_batch(request, 1, body.n)
    group = start_group(request, worker, _requests([ids], params, n=body.n, truncate=body.truncate_prompt))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream and body.stream_options is not None and body.stream_options.include_usage:
        meta["usage"] = None  # as OpenAI: every chunk has the field, null until the last one
    if body.stream:
        first = await group.first_event()
        chunks = _chat_chunks(group, first, body, tokenizer, meta)
        return EventStream(_stream_with_errors(chunks, request.url.path), group=group)
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text.lstrip()},
            "logprobs": _chat_logprobs(tokenizer, c.logprobs) if body.logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in await group.run()
    ]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(group, body.n)}


async def _chat_chunks(
    group: GenerationGroup, first: Any, body: ChatCompletionRequest, tokenizer: Tokenizer, meta: dict[str, Any]
) -> AsyncIterator[str]:
    started = [False] * len(group.choices)  # whether a choice's content has begun (leading space dropped)

    def chunk(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish: str | None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return json.dumps({**meta, "object": "chat.completion.chunk", "choices": [choice]})

    for c in group.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""}, None, None)
    async for index, event in _chain([first] if first is not None else [], group):
        text = event.text
        if not started[index]:
            text = text.lstrip()
            started[index] = bool(text)
        finish = group.choices[index].finish_reason if event.finish_reason is not None else None
        logprobs = _chat_logprobs(tokenizer, event.logprobs) if body.logprobs and event.logprobs else None
        if text or logprobs is not None or finish is not None:
            yield chunk(index, {"content": text} if text or finish is None else {}, logprobs, finish)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield json.dumps({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(group, body.n)})
