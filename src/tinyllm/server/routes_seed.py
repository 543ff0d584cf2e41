"""The seed's routes, kept exactly: `POST /generate/custom` and `POST /generate/gpt2`, plus `POST /tokenize`.

`{"prompt": "..."}` -> `{"generated_text": "<prompt + continuation>"}`. Optional fields: max_new_tokens,
temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, truncate_prompt, stream. Omitted
sampling fields take the server defaults (64 tokens, temperature 0.8, top_k 50, top_p 0.95, repetition
penalty 1.2: see `SamplingDefaults`).

With `"stream": true` the answer is server-sent events: `data: {"text": "<delta>"}` per piece of text; the last
event also carries `"finish_reason": "stop"|"length"`, `"generated_text"` and `"usage"` (its `text` is the last
piece, often not empty: a client appends every event's `text`), then `data: [DONE]`. An error after the stream
has started arrives as `data: {"detail": ..., "type": ...}` before `[DONE]`. Errors before it are ordinary JSON
responses (see errors.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tinyllm.engine import Request as EngineRequest
from tinyllm.errors import TinyLLMError
from tinyllm.server.errors import error_body, to_api_error
from tinyllm.server.generation import SSE_DONE, EventStream, GenerationGroup, sse
from tinyllm.server.schemas import (
    GenerateRequest,
    GenerateResponse,
    TokenizeRequest,
    TokenizeResponse,
    error_responses,
)
from tinyllm.server.service import (
    check_max_tokens,
    encode,
    sampling_params,
    settings_of,
    start_group,
    tokenizer_of,
    worker_for,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["seed"])

_GENERATE_DOC = {
    "response_model": GenerateResponse,
    "responses": {
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when `stream` is true"},
        **error_responses(400, 401, 404, 413, 415, 422, 429, 503),
    },
}


@router.post("/generate/custom", summary="Continue a prompt with your trained model", **_GENERATE_DOC)
async def generate_custom(body: GenerateRequest, request: Request) -> GenerateResponse | StreamingResponse:
    return await _generate("custom", body, request)


@router.post("/generate/gpt2", summary="Continue a prompt with pretrained GPT-2", **_GENERATE_DOC)
async def generate_gpt2(body: GenerateRequest, request: Request) -> GenerateResponse | StreamingResponse:
    return await _generate("gpt2", body, request)


async def _generate(model: str, body: GenerateRequest, request: Request) -> GenerateResponse | StreamingResponse:
    settings = settings_of(request)
    defaults = settings.sampling
    worker = worker_for(request, model)
    _, loaded = worker.require()
    max_new = check_max_tokens(settings, body.max_new_tokens or defaults.max_new_tokens, param="max_new_tokens")
    params = sampling_params(
        max_new_tokens=max_new,
        temperature=_pick(body.temperature, defaults.temperature),
        top_k=_pick(body.top_k, defaults.top_k),
        top_p=_pick(body.top_p, defaults.top_p),
        min_p=_pick(body.min_p, defaults.min_p),
        repetition_penalty=_pick(body.repetition_penalty, defaults.repetition_penalty),
        seed=body.seed,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
    )
    ids = await encode(loaded.tokenizer, body.prompt)
    group = start_group(request, worker, [EngineRequest(prompt=ids, params=params, truncate=body.truncate_prompt)])
    if not body.stream:
        (choice,) = await group.run()
        return GenerateResponse(generated_text=body.prompt + choice.text)
    await group.first_event()  # errors before the first token are still a status code
    return EventStream(_stream(group, body.prompt, request.url.path), group=group)


def _pick(value: float | int | None, default: float | int) -> float | int:
    return default if value is None else value


async def _stream(group: GenerationGroup, prompt: str, path: str) -> AsyncIterator[bytes]:
    """SSE of text deltas; `first_event` has already applied the first event to the choice."""
    choice = group.choices[0]
    sent = 0  # characters of choice.text already sent
    try:
        if choice.finish_reason is None and choice.text:
            sent = len(choice.text)
            yield sse(json.dumps({"text": choice.text}))
        async for _, event in group.events():
            if event.finish_reason is None and event.text:
                sent += len(event.text)
                yield sse(json.dumps({"text": event.text}))
        usage = {"prompt_tokens": group.prompt_tokens, "completion_tokens": group.completion_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        final = {
            "text": choice.text[sent:],
            "finish_reason": choice.finish_reason,
            "generated_text": prompt + choice.text,
            "usage": usage,
        }
        yield sse(json.dumps(final))
        yield SSE_DONE
    except TinyLLMError as exc:  # after the headers: report in-band
        error = to_api_error(exc)
        yield sse(json.dumps(error_body(path, message=error.message, type=error.type, code=error.code)))
        yield SSE_DONE
    finally:
        group.close()


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    summary="Split text into a model's tokens",
    responses=error_responses(400, 401, 404, 413, 415, 422, 503),
)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    model, tokenizer = await tokenizer_of(request, body.model)
    ids = await encode(tokenizer, body.text) if body.text else []
    if len(ids) > 1000:  # a long text's pieces are built off the event loop, as its encoding was
        tokens = await asyncio.to_thread(tokenizer.token_strings, ids, escape_partial=True)
    else:
        tokens = tokenizer.token_strings(ids, escape_partial=True)
    return TokenizeResponse(ids=ids, tokens=tokens, model=model, tokenizer=tokenizer.name)
