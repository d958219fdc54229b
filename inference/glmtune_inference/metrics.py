"""Prometheus metrics of the inference server, in a registry of its own (one per app, so tests and
several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class ServerMetrics:
    """Requests, tokens, queue depth, batch sizes and latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glmtune_requests", "HTTP requests by endpoint and status code",
                                ("endpoint", "status"), registry=r)
        self.prompt_tokens = Counter("glmtune_prompt_tokens", "Prompt tokens of admitted requests",
                                     ("model",), registry=r)
        self.completion_tokens = Counter("glmtune_completion_tokens", "Generated tokens", ("model",), registry=r)
        self.finished = Counter("glmtune_generations", "Finished generations by finish reason",
                                ("model", "reason"), registry=r)
        self.queue_depth = Gauge("glmtune_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("glmtune_running_requests", "Requests being generated", registry=r)
        self.request_latency = Histogram("glmtune_request_duration_seconds", "Time from request to last byte",
                                         ("endpoint",), buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("glmtune_time_to_first_token_seconds", "Time from request to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.token_time = Histogram("glmtune_time_per_output_token_seconds",
                                    "Mean time between generated tokens of a request",
                                    buckets=_TOKEN_TIME_BUCKETS, registry=r)
        self.batch_size = Histogram("glmtune_batch_size", "Requests advanced by one decode forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)

    def track_engine(self, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        """Read the engine's queue depth and running count at scrape time."""
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.running.set_function(lambda: float(running()))

    def track_memory(self, engine: Any) -> None:
        """Gauges read at scrape time: the serving device's memory in use (GPU: torch's allocated bytes; CPU: the
        process's resident set), the running requests' KV cache bytes and the KV budget admission uses."""
        from glmtune_inference.loading import served_device
        from glmtune_inference.memory import device_memory_bytes

        device = served_device(engine.models)
        memory = Gauge("glmtune_device_memory_bytes", "Memory in use on the serving device (GPU: allocated by "
                       "torch; CPU: process resident set)", ("device",), registry=self.registry)
        memory.labels(str(device)).set_function(lambda: float(device_memory_bytes(device)))
        Gauge("glmtune_kv_cache_bytes", "Bytes held by the running requests' KV caches",
              registry=self.registry).set_function(lambda: float(engine.kv_cache_bytes))
        if engine.kv_budget is not None:  # absent without a budget: a 0 would read as "nothing may run"
            Gauge("glmtune_kv_budget_bytes", "KV cache bytes admission may promise",
                  registry=self.registry).set(engine.kv_budget)

    def observe_finished(self, model: str, done: Any) -> None:
        """Count a finished request's tokens and finish reason (called by the engine for every request)."""
        self.prompt_tokens.labels(model).inc(done.prompt_tokens)
        self.completion_tokens.labels(model).inc(done.completion_tokens)
        self.finished.labels(model, done.reason).inc()

    def render(self) -> bytes:
        """The text exposition format for `GET /metrics`."""
        return generate_latest(self.registry)
