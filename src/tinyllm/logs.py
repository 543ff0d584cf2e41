"""Logging for tinyllm's commands and the processes they start (the library itself only logs)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int) -> None:
    """Time-stamped lines on stderr at `level`, one per record (see `one_line_per_record`)."""
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S")
    one_line_per_record()


def one_line_per_record() -> None:
    """huggingface_hub gives its logger a handler of its own when imported and lets records propagate to the root
    too, so under our logging each of its warnings (a retry, say) printed twice, once without a time stamp. Its
    handler goes; its records go through ours."""
    try:
        import huggingface_hub.utils.logging  # noqa: F401 (adds that handler now, so it can go)
    except ImportError:
        return
    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)
