"""Pure ASGI middleware (streaming-safe, unlike `BaseHTTPMiddleware`), outermost first:

1. `RequestContextMiddleware`: X-Request-ID (echoed, or generated), one structured access-log line per
   request, request metrics, and the catch-all that turns a bug into a generic 500 JSON and logs it.
2. `HostCheckMiddleware`: a Host header the server does not answer to gets 400 JSON (DNS rebinding: a web
   page whose name is made to point at 127.0.0.1 would otherwise reach a loopback server as same-origin).
3. `APIKeyMiddleware`: `Authorization: Bearer <key>` on every route but the public ones (401 JSON).
4. `BodyLimitMiddleware`: 413 JSON for a body over the limit, by Content-Length or by counting a streamed
   (chunked) body; the body is read here and replayed to the app.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinyllm.server.errors import (
    APIError,
    AuthenticationError,
    PayloadTooLargeError,
    error_response,
    internal_error_response,
)
from tinyllm.server.metrics import Metrics
from tinyllm.server.settings import LOOPBACK_HOSTS

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("tinyllm.server.access")

REQUEST_ID_HEADER = "x-request-id"
# The web page loads only its own script and style and talks only to this server; nobody may frame it.
PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Reachable without the API key: liveness, the web page (which then sends the key itself) and the API docs.
PUBLIC_PATHS = frozenset({"/health", "/", "/favicon.ico", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/",)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def _method_label(method: str) -> str:
    """The method as a metrics label: any other token a client sends ("FOO0", "get") is "other" (bounded)."""
    return method if method in _METHODS else "other"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id, access log, metrics and the last line of defence against bugs."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # to label requests the middleware below answered (401, 413) by their route

    def _route(self, scope: Scope, unrouted: Scope) -> str:
        """The route template for metrics ("/v1/models/{model}"); "unmatched" for no route (bounded labels).
        `unrouted`: the scope as the request came, for requests answered before routing (401, 413)."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(unrouted)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = incoming if incoming and _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500
        started = disconnected = False
        unrouted = dict(scope)  # routing rewrites the scope (a mount's root_path): match the request as it came

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                headers.append((b"x-content-type-options", b"nosniff"))
                if scope["path"] == "/" or scope["path"].startswith("/static/"):
                    headers += PAGE_HEADERS
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive_watching, send_with_id)
        except Exception:  # a bug: log it with the request id, answer without internals
            logger.exception("unhandled error in %s %s (request id %s)", scope["method"], scope["path"], request_id)
            if not started:
                await internal_error_response(scope["path"])(scope, receive, send_with_id)
        finally:
            if disconnected and not started:  # the client left before its body was in (or any answer): nginx's 499
                status = 499
            seconds = time.perf_counter() - start
            route = self._route(scope, unrouted)
            self.metrics.observe_request(
                method=_method_label(scope["method"]), route=route, status=status, seconds=seconds
            )
            access_logger.info(
                "method=%s path=%r status=%d duration_ms=%.1f request_id=%s",  # %r: a path cannot forge a log line
                scope["method"],
                scope["path"],
                status,
                seconds * 1000,
                request_id,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                    "request_id": request_id,
                },
            )


def host_name(header: str) -> str:
    """The name in a Host header, without its port, lower-cased: "[::1]:5000" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheckMiddleware:
    """Answer only requests whose Host header names one of `allowed` (a name, or "*.example.com")."""

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = tuple(name.lower() for name in allowed)

    def _allows(self, name: str) -> bool:
        if name in LOOPBACK_HOSTS:  # a rebinding page's requests carry its own name, never these (health checks do)
            return True
        return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = _header(scope, b"host") if scope["type"] == "http" else None
        if header is None or self._allows(host_name(header)):  # no Host at all: not a browser (HTTP/1.0)
            await self.app(scope, receive, send)
            return
        error = APIError(
            f"this server does not answer to the host name {host_name(header)[:100]!r}; it answers to "
            f"{', '.join(self.allowed)} (set TINYLLM_ALLOWED_HOSTS to add names, '*' for any)",
            code="invalid_host",
        )
        await error_response(scope["path"], error)(scope, receive, send)


class APIKeyMiddleware:
    """Require `Authorization: Bearer <api_key>` outside the public paths."""

    def __init__(self, app: ASGIApp, *, api_key: str, public_paths: Iterable[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.public_paths or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.expected):
            await self.app(scope, receive, send)
            return
        reason = "missing API key" if not auth else "invalid API key"
        error = AuthenticationError(
            f"{reason}: send the server's key as `Authorization: Bearer <key>` (see TINYLLM_API_KEY)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error_response(path, error)(scope, receive, send)


class BodyLimitMiddleware:
    """Reject bodies over `max_bytes` with 413 before the app parses them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, scope: Scope) -> ASGIApp:
        return error_response(
            scope["path"],
            PayloadTooLargeError(f"request body is larger than the server's limit of {self.max_bytes} bytes"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as the server would

        await self.app(scope, replay, send)
