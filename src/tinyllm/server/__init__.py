"""The HTTP server: seed routes, an OpenAI-compatible API, operations routes and the web page.

Layers: settings.py (config) -> schemas*.py (bodies and bounds) -> routes_*.py (thin) -> service.py and
generation.py (requests in flight) -> worker.py (one thread per model that owns its Engine). Errors become
HTTP in errors.py; middleware.py adds request ids, access logs, metrics, the API key and the body limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinyllm.server.settings import SamplingDefaults, ServerSettings

if TYPE_CHECKING:
    from tinyllm.server.app import create_app, serve

__all__ = ["SamplingDefaults", "ServerSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    # create_app / serve pull in FastAPI and torch: import them on first use, not with the package.
    if name in ("create_app", "serve"):
        from tinyllm.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
