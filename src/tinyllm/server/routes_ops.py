"""Operations routes: `GET /health` (liveness), `GET /ready` (which models answer), `GET /metrics`, `GET /`.

`/health` is always 200 while the process serves HTTP; `/ready` is 200 when at least one model is loaded
and 503 otherwise, and lists every model's state and, when it is unavailable, the message that says how to
fix it. `GET /` serves the web page (`static/index.html`) when it is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tinyllm.server.errors import NotFoundError
from tinyllm.server.schemas import HealthResponse, ReadyResponse, error_responses

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=HealthResponse, summary="Liveness: the process answers HTTP")
@router.head("/health", include_in_schema=False)  # load balancers' and uptime checkers' probe
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=ReadyResponse,
    summary="Readiness: which models are loaded (503 when none is)",
    responses={503: {"model": ReadyResponse, "description": "no model is loaded"}, **error_responses(401)},
)
async def ready(request: Request) -> JSONResponse:
    workers = request.app.state.workers
    models: dict[str, Any] = {name: w.describe() for name, w in workers.items()}
    any_ready = any(w.ready for w in workers.values())
    body = {"status": "ready" if any_ready else "unavailable", "models": models}
    return JSONResponse(body, status_code=200 if any_ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **error_responses(401)},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/",
    summary="The web page",
    response_class=FileResponse,
    responses={200: {"content": {"text/html": {}}}, **error_responses(404)},
)
async def index() -> FileResponse:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise NotFoundError("the web page is not installed (src/tinyllm/server/static/index.html is missing)")
    return FileResponse(page, media_type="text/html")
