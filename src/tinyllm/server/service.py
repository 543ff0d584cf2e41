"""What routes need from the app, in one place: the model's worker, the tokenizer, sampling parameters.

Routes stay thin: they turn a request body into token ids and `SamplingParams` here, run a
`GenerationGroup`, and format its choices.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from tinyllm.engine import Request as EngineRequest
from tinyllm.errors import TinyLLMError
from tinyllm.sampling import SamplingParams
from tinyllm.server.errors import APIError, NotFoundError, UnavailableError, to_api_error
from tinyllm.server.generation import GenerationGroup
from tinyllm.server.metrics import Metrics
from tinyllm.server.settings import ServerSettings
from tinyllm.server.worker import ModelWorker
from tinyllm.tokenizer import Tokenizer

_ENCODE_INLINE_CHARS = 8192  # longer texts are tokenized off the event loop


def settings_of(request: Request) -> ServerSettings:
    return request.app.state.settings


def metrics_of(request: Request) -> Metrics:
    return request.app.state.metrics


def worker_for(request: Request, model: str) -> ModelWorker:
    """The worker serving `model`, or 404 naming the models there are."""
    workers: dict[str, ModelWorker] = request.app.state.workers
    if model not in workers:
        raise NotFoundError(
            f"unknown model {model!r}; this server has {', '.join(sorted(workers)) or 'none'}",
            param="model",
            code="model_not_found",
        )
    return workers[model]


async def tokenizer_of(request: Request, model: str | None = None) -> tuple[str | None, Tokenizer]:
    """The tokenizer /tokenize uses and the model it belongs to. With `model`: that model's (404 when the
    server has no such model, 503 while it is not loaded). Without: the first loaded of "custom" then "gpt2",
    else the app's fallback (`create_app(tokenizer=...)`, else GPT-2's BPE; 503 when its files are missing)."""
    workers: dict[str, ModelWorker] = request.app.state.workers
    if model is not None:
        _, loaded = worker_for(request, model).require()
        return model, loaded.tokenizer
    for name in ("custom", "gpt2", *sorted(workers)):
        worker = workers.get(name)
        if worker is not None and worker.loaded is not None:
            return name, worker.loaded.tokenizer
    state = request.app.state
    if state.tokenizer is None:
        from tinyllm.tokenizer import get_tokenizer

        try:
            state.tokenizer = await asyncio.to_thread(get_tokenizer)
        except TinyLLMError as exc:
            raise UnavailableError(str(exc), code="tokenizer_unavailable") from exc
    return None, state.tokenizer


async def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`; an empty text is the end-of-text token (GPT-2's start of an unconditional sample)."""
    if not text:
        return [tokenizer.eot_token]
    if len(text) <= _ENCODE_INLINE_CHARS:
        return tokenizer.encode(text)
    return await asyncio.to_thread(tokenizer.encode, text)


def check_max_tokens(settings: ServerSettings, value: int, *, param: str) -> int:
    if value > settings.max_new_tokens_cap:
        raise APIError(
            f"{param} is {value} but this server allows at most {settings.max_new_tokens_cap} new tokens",
            param=param,
            code="invalid_value",
        )
    return value


MIN_TOP_P = 1e-3  # below it, rounding in the nucleus sum can drop every token: it means "the top token only"


def sampling_params(**fields: Any) -> SamplingParams:
    """`SamplingParams` from fields (None means "the dataclass default"); a bad combination is a 400.

    A temperature below `tinyllm.sampling.MIN_TEMPERATURE` is greedy (as everywhere); a top_p below `MIN_TOP_P`
    keeps the likeliest token only (top_k 1).
    """
    top_p = fields.get("top_p")
    if top_p is not None and top_p < MIN_TOP_P:
        fields.update(top_p=1.0, top_k=1)
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except TinyLLMError as exc:
        raise to_api_error(exc) from exc


def start_group(
    request: Request,
    worker: ModelWorker,
    requests: list[EngineRequest],
) -> GenerationGroup:
    """Submit `requests` to `worker` as one group with the server's deadline (errors map to 4xx / 503)."""
    group = GenerationGroup(
        worker=worker,
        requests=requests,
        timeout_s=settings_of(request).request_timeout_s,
        metrics=metrics_of(request),
        is_disconnected=request.is_disconnected,
    )
    group.submit()
    return group
