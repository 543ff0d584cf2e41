"""The app factory and the entry point: `create_app(settings)` builds the FastAPI app, `serve(settings)` runs it.

Nothing happens at import. Models load in the lifespan, each on its own worker thread (see worker.py);
startup waits up to `settings.load_wait_s` for them, and a model that is slower keeps loading in the
background while the server already answers (its routes say 503 "loading" meanwhile). While the app
runs, torch uses `settings.torch_threads` intra-op threads (default: cores - 1; restored at shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import FrameType

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from tinyllm import __version__
from tinyllm.server import routes_openai, routes_ops, routes_seed
from tinyllm.server.errors import install_error_handlers
from tinyllm.server.metrics import Metrics
from tinyllm.server.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    RequestContextMiddleware,
)
from tinyllm.server.routes_ops import STATIC_DIR
from tinyllm.server.settings import LOOPBACK_HOSTS, ServerSettings
from tinyllm.server.worker import EngineFactory, Loader, ModelWorker, default_engine, default_loaders
from tinyllm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def _wait_for(workers: Mapping[str, ModelWorker], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for worker in workers.values():
        if not worker.wait_loaded(max(0.0, deadline - time.monotonic())):
            logger.info("model %r is still loading; the server starts without it for now", worker.name)


def create_app(
    settings: ServerSettings,
    *,
    loaders: Mapping[str, Loader] | None = None,
    engine_factory: EngineFactory = default_engine,
    tokenizer: Tokenizer | None = None,
) -> FastAPI:
    """The tinyllm HTTP API.

    Args:
        settings: the server's configuration.
        loaders: model id -> loader (default: "custom" from `settings.checkpoint`, "gpt2" from `settings.gpt2`).
            Tests pass ready-made models here so they need no files or network.
        engine_factory: builds each model's engine (default: `settings.slots` slots, `settings.max_queue`).
        tokenizer: the tokenizer for /tokenize when no model is loaded (default: a loaded model's, else GPT-2's).
    """
    metrics = Metrics()
    model_loaders = dict(loaders if loaders is not None else default_loaders(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        workers = {
            name: ModelWorker(name=name, loader=loader, settings=settings, engine_factory=engine_factory)
            for name, loader in model_loaders.items()
        }
        for worker in workers.values():
            metrics.watch_model(
                worker.name,
                queue_depth=lambda w=worker: w.queue_depth,
                active_slots=lambda w=worker: w.active_slots,
                loaded=lambda w=worker: float(w.ready),
            )
            worker.start()
        app.state.workers = workers
        previous_threads = torch.get_num_threads()
        threads = settings.resolved_torch_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        await asyncio.to_thread(_wait_for, workers, settings.load_wait_s)
        try:
            yield
        finally:
            for worker in workers.values():
                await asyncio.to_thread(worker.stop)
            torch.set_num_threads(previous_threads)

    app = FastAPI(
        title="tinyllm",
        version=__version__,
        summary="Serve your trained GPT next to pretrained GPT-2: seed routes, an OpenAI-compatible API, metrics.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.workers = {}
    app.state.tokenizer = tokenizer
    app.state.started = int(time.time())
    install_error_handlers(app)
    routes = []
    for module in (routes_seed, routes_openai, routes_ops):
        app.include_router(module.router)
        routes += module.router.routes  # (app.routes holds the included routers themselves, without paths)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # add_middleware wraps the app so far: the last added runs first.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if "*" not in (allowed := settings.resolved_allowed_hosts()):
        app.add_middleware(HostCheckMiddleware, allowed=allowed)
    # every route (the API docs and /static too) names its requests in the metrics, even those answered before
    # routing (401, 413, a wrong host)
    routes += [r for r in app.routes if getattr(r, "path", None)]
    app.add_middleware(RequestContextMiddleware, metrics=metrics, routes=routes)
    return app


def serve(settings: ServerSettings, *, log_level: str = "info") -> None:
    """Run the server with uvicorn until interrupted (blocks).

    Args:
        settings: the server's configuration (host, port, models, limits).
        log_level: uvicorn's log level.
    """
    if not logging.getLogger().handlers:  # called from Python, not the CLI (which has set logging up)
        from tinyllm import logs

        logs.configure(logging.INFO)
    if settings.host not in LOOPBACK_HOSTS and not settings.api_key:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this machine can use it "
            "(set TINYLLM_API_KEY or --api-key)",
            settings.host,
        )
    logger.info("tinyllm server on http://%s:%d (docs at /docs)", settings.host, settings.port)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,  # RequestContextMiddleware writes one structured line per request
        timeout_graceful_shutdown=5,
    )
    GracefulServer(config).run()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but a stop signal (SIGTERM, Ctrl-C) also ends the generations in flight at once:
    uvicorn drains connections before the app's shutdown runs, so the engines would keep working through their
    queues until its graceful-shutdown timeout cancelled the handlers (plain-text 500s, streams cut without
    [DONE]). Each request now answers 503 "shutting down" (or ends its stream with that reason)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        for worker in getattr(getattr(self.config.app, "state", None), "workers", {}).values():
            worker.begin_shutdown()
