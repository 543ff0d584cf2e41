"""Prometheus metrics of one app, in its own `CollectorRegistry` (so apps and tests never share counters).

Names (all prefixed `tinyllm_`):

    http_requests_total{method, route, status}       requests answered, by route template
    http_request_duration_seconds{route}             time to the end of the response (streams included)
    prompt_tokens_total{model}                       tokens read from prompts
    generated_tokens_total{model}                    tokens generated
    time_to_first_token_seconds{model}               submit -> first generated token
    generation_seconds{model}                        submit -> last generated token
    queue_depth{model}                               requests waiting for a slot (read at scrape time)
    active_slots{model}                              sequences being decoded (read at scrape time)
    model_loaded{model}                              1 when the model answers, 0 while loading or unavailable
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 5 ms to 5 min: a tiny model answers in milliseconds, a long CPU generation in minutes.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The app's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tinyllm_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "tinyllm_http_request_duration_seconds", "HTTP request duration", ["route"], buckets=_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("tinyllm_prompt_tokens", "Prompt tokens read", ["model"], registry=r)
        self.generated_tokens = Counter("tinyllm_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft_seconds = Histogram(
            "tinyllm_time_to_first_token_seconds", "Submit to first token", ["model"], buckets=_BUCKETS, registry=r
        )
        self.generation_seconds = Histogram(
            "tinyllm_generation_seconds", "Submit to last token", ["model"], buckets=_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("tinyllm_queue_depth", "Requests waiting for a slot", ["model"], registry=r)
        self.active_slots = Gauge("tinyllm_active_slots", "Sequences being decoded", ["model"], registry=r)
        self.model_loaded = Gauge("tinyllm_model_loaded", "1 when the model is ready", ["model"], registry=r)

    def watch_model(
        self,
        model: str,
        *,
        queue_depth: Callable[[], float],
        active_slots: Callable[[], float],
        loaded: Callable[[], float],
    ) -> None:
        """Gauges of `model` read from callbacks at scrape time (no bookkeeping on the hot path)."""
        self.queue_depth.labels(model).set_function(queue_depth)
        self.active_slots.labels(model).set_function(active_slots)
        self.model_loaded.labels(model).set_function(loaded)

    def observe_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
