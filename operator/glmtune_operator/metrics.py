"""Prometheus metrics of the operator, served at http://<GLMTUNE_METRICS_BIND>/metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

REGISTRY = CollectorRegistry()
RUNS = Counter("glmtune_runs", "Training runs by outcome (started, succeeded, failed).",
               ["namespace", "outcome"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram(
    "glmtune_reconcile_duration_seconds", "Time spent in one handler call (reconcile latency).", ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
RECONCILE_ERRORS = Counter("glmtune_reconcile_errors", "Handler calls that raised (retried with backoff).",
                           ["handler"], registry=REGISTRY)


def count_run(namespace: str, outcome: str) -> None:
    """Count a run that started, succeeded (its model serves or was exported) or failed."""
    RUNS.labels(namespace=namespace, outcome=outcome).inc()


@contextmanager
def timed(handler: str) -> Iterator[None]:
    """Measure one handler call; errors are counted and re-raised."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(handler=handler).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(handler=handler).observe(time.perf_counter() - start)


def serve(bind: str) -> None:
    """Start the /metrics HTTP endpoint on `host:port` (a daemon thread)."""
    host, _, port = bind.rpartition(":")
    start_http_server(int(port), addr=host, registry=REGISTRY)
