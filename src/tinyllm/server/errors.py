"""The one place that turns exceptions into HTTP answers.

Every error is JSON. Routes under `/v1/` answer in OpenAI's shape, so the `openai` SDK raises its usual
exceptions; every other route answers in a flat shape with the same fields:

    /v1/*:   {"error": {"message": "...", "type": "...", "param": "...", "code": "..."}}
    others:  {"detail": "...", "type": "...", "param": "...", "code": "..."}

Statuses: 400 bad input (invalid JSON, prompt longer than the context, inconsistent sampling), 401 missing
or wrong API key, 404 unknown route or model, 413 body too large, 415 a body not sent as JSON (no or
another Content-Type), 422 a field fails validation (`param` names it; under /v1/ a 400, as OpenAI answers),
429 queue full (with Retry-After), 503 model not loaded / still loading / no slot before the deadline (with
Retry-After where waiting helps, x-should-retry: false where it cannot), 500 only for bugs: a generic
message, the traceback goes to the log and never to the client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllm.errors import TinyLLMError

logger = logging.getLogger(__name__)


class APIError(TinyLLMError):
    """An error with its HTTP status, OpenAI error `type`, and optional `param`, `code` and headers."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})


class AuthenticationError(APIError):
    status, type = 401, "authentication_error"


class NotFoundError(APIError):
    status, type = 404, "not_found_error"


class PayloadTooLargeError(APIError):
    status, code = 413, "request_too_large"


class OverloadedError(APIError):
    """The model's queue is full: try again shortly."""

    status, type = 429, "rate_limit_error"


class UnavailableError(APIError):
    """The model is not loaded (or still loading), or no slot freed up before the deadline."""

    status, type = 503, "service_unavailable"


class ClientClosedError(APIError):
    """The client went away before the answer (nginx's 499, for the access log; nobody reads the body)."""

    status, type = 499, "client_closed_request"


class ServerError(APIError):
    """A failure inside the server that is not the client's doing; the message holds no internals."""

    status, type = 500, "server_error"


def _param_from_message(message: str) -> str | None:
    """SamplingError messages start with the parameter's name ("top_p must be ...")."""
    first = message.split(" ", 1)[0]
    return first if first.isidentifier() else None


def to_api_error(exc: TinyLLMError) -> APIError:
    """The HTTP meaning of a tinyllm error (matched by class name along its MRO, so nothing heavy is imported)."""
    if isinstance(exc, APIError):
        return exc
    names = {cls.__name__ for cls in type(exc).__mro__}
    message = str(exc)
    if "QueueFullError" in names:
        return OverloadedError(message, code="queue_full", headers={"Retry-After": "1"})
    if "PromptTooLongError" in names:
        return APIError(message, param="prompt", code="context_length_exceeded")
    if "InvalidPromptError" in names:
        return APIError(message, param="prompt", code="invalid_prompt")
    if "SamplingError" in names:
        return APIError(message, param=_param_from_message(message), code="invalid_value")
    if names & {"GPT2UnavailableError", "CheckpointError", "TokenizerError"}:
        return UnavailableError(message, code="model_unavailable")
    return APIError(message)


def error_body(
    path: str, *, message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON error body for a request to `path` (OpenAI's shape under /v1/)."""
    if path.startswith("/v1/") or path == "/v1":
        if type == "not_found_error":  # OpenAI calls an unknown model or URL an invalid request (status 404)
            type = "invalid_request_error"
        return {"error": {"message": message, "type": type, "param": param, "code": code}}
    return {"detail": message, "type": type, "param": param, "code": code}


class _EscapedJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote the client's text, and a lone surrogate in it
    (valid in JSON's escapes, not in UTF-8) must not turn the error into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(path: str, error: APIError) -> JSONResponse:
    body = error_body(path, message=error.message, type=error.type, param=error.param, code=error.code)
    return _EscapedJSONResponse(body, status_code=error.status, headers=error.headers or None)


def internal_error_response(path: str) -> JSONResponse:
    """What a bug looks like to the client: no internals."""
    body = error_body(path, message="internal server error; the server log has the details", type="server_error")
    return JSONResponse(body, status_code=500)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc_to_param(loc: Sequence[Any]) -> str | None:
    """The field a pydantic error location names ("messages.0.content"), without the location's kind and the
    tags pydantic adds for a union's branches ("str", "list[constrained-int]", "function-after[...]")."""
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int) or (str(p).isidentifier() and p not in _UNION_TAGS | {"body", "query", "path", "header"})
    ]
    return ".".join(parts) or None


def _is_type_mismatch(err: Mapping[str, Any]) -> bool:
    return str(err.get("type", "")).endswith(("_type", "_parsing"))


def _telling(errors: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A union field ("stop": a string or a list of them) fails once per branch; the branch whose type the input
    had says what is wrong ("at most 4 items"), the others only that the input is not their type."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for err in errors:
        groups.setdefault(_loc_to_param(err.get("loc", ())) or "body", []).append(err)
    by_top: dict[str, list[Mapping[str, Any]]] = {}
    for where, errs in groups.items():
        by_top.setdefault(where.split(".", 1)[0], []).extend(errs)
    kept: list[Mapping[str, Any]] = []
    for errs in by_top.values():
        telling = [e for e in errs if not _is_type_mismatch(e)]
        kept += telling or errs
    return kept


def validation_error(errors: Sequence[Mapping[str, Any]], *, status: int = 422) -> APIError:
    """A 400 for a body that is not JSON, else a `status` (422; OpenAI's routes: 400) naming the first offending
    field."""
    if not errors:
        return APIError("invalid request", status=status)
    errors = _telling(errors)
    first = errors[0]
    if first.get("type") == "json_invalid":
        pos = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return APIError(f"request body is not valid JSON ({reason} at position {pos})", code="invalid_json")
    by_field: dict[str, str] = {}  # a union's branches fail at one field: its first branch's reason is the one
    for err in errors:
        where = _loc_to_param(err.get("loc", ())) or "body"
        by_field.setdefault(where, str(err.get("msg", "invalid")).removeprefix("Value error, "))
    messages = [f"{where}: {msg}" for where, msg in list(by_field.items())[:5]]
    more = f" (and {len(by_field) - 5} more)" if len(by_field) > 5 else ""
    return APIError("; ".join(messages) + more, param=_loc_to_param(first.get("loc", ())), status=status)


def _is_json(content_type: str) -> bool:
    """application/json or application/<anything>+json, parameters aside (what FastAPI reads as JSON)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; the catch-all for bugs lives in the request middleware (see middleware.py)."""

    async def on_tinyllm_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TinyLLMError)
        error = to_api_error(exc)
        logger.info("%s %s -> %d %s", request.method, request.url.path, error.status, error.message)
        return error_response(request.url.path, error)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        content_type = request.headers.get("content-type", "")
        if errors and tuple(errors[0].get("loc", ())) == ("body",) and not _is_json(content_type):
            # the body was not read as JSON (no Content-Type is not JSON either: a cross-site form cannot post it)
            sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
            message = f"send the body as JSON with Content-Type: application/json (got {sent})"
            return error_response(request.url.path, APIError(message, status=415, code="unsupported_media_type"))
        # OpenAI answers a bad parameter with 400 (its SDKs raise BadRequestError); FastAPI's 422 elsewhere
        status = 400 if request.url.path.startswith("/v1/") else 422
        return error_response(request.url.path, validation_error(errors, status=status))

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = {401: AuthenticationError, 404: NotFoundError, 413: PayloadTooLargeError}.get(exc.status_code, APIError)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = None
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's, e.g. not UTF-8
            message, code = "request body could not be read as JSON (not UTF-8, or nested too deeply)", "invalid_json"
        error = kind(message, status=exc.status_code, headers=exc.headers, code=code)
        if exc.status_code >= 500:
            error.type = "server_error"
        return error_response(request.url.path, error)

    app.add_exception_handler(TinyLLMError, on_tinyllm_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
