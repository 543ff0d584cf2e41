"""Helpers shared by the decode-step tests (imported as a module, like server_helpers)."""

from __future__ import annotations

from tinyllm.engine import Engine, Request
from tinyllm.sampling import SamplingParams


def run_to_end(engine: Engine, prompts: list[list[int]], params: dict) -> list[list[int]]:
    """Submit each prompt with `params`, step the engine until it is idle; the generated ids, in prompt order."""
    handles = [engine.submit(Request(prompt=p, params=SamplingParams(**params))) for p in prompts]
    while engine.has_work():
        engine.step()
    return [h.result().token_ids for h in handles]
