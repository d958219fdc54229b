"""Eval-gated, canaried promotion (`serving.promotion`), as pure decisions and status transitions.

After the export is verified: the metrics gate compares the new export's held-out eval loss with the serving
model's; then a canary Deployment of the new model runs behind the same Service (a share of the traffic by
pod count) while the stable one keeps serving the old model. Once its pods are ready, every canary pod must
answer the golden prompts; then its own Prometheus metrics (5xx share and p95 latency of its API requests,
counted since the pod started, so the judgement needs no baseline and survives an operator restart) are
watched for `canary.durationSeconds`. Passing promotes (phase Deploying: the stable Deployment rolls to the
new model, the canary is removed once that rollout is done); failing removes the canary and records
`Promoted=False` with reason `PromotionFailed` (gate, golden prompt) or `CanaryFailed` (readiness, errors,
latency) and a message naming the prompt or figure. Every step is a status write with the time it began, so
a restarted operator resumes the same canary and never promotes twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from glmtune.spec.promotion import CanarySpec
from glmtune_operator.phases import (
    CANARY,
    CANARY_CLEARED,
    DEPLOYING,
    FAILED,
    SERVING,
    Event,
    Transition,
    _conditions,
    _history,
    get_condition,
    timestamp,
    with_condition,
)

PROMOTION_FAILED, CANARY_FAILED = "PromotionFailed", "CanaryFailed"
STARTING, OBSERVING = "Starting", "Observing"
_NOT_API = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes are not the API's traffic


def eval_gate(candidate: Mapping[str, float] | None, serving: Mapping[str, float] | None,
              max_increase: float | None, serving_uri: str | None) -> str | None:
    """Why the new export fails `maxEvalLossIncrease` against the serving model's, or None when it passes.

    Nothing serving (first model) or a serving export without `eval_loss` leaves nothing to compare: pass.
    A new export without `eval_loss` fails: the gate cannot vouch for it."""
    if max_increase is None or not serving_uri or serving is None or "eval_loss" not in serving:
        return None
    if candidate is None or "eval_loss" not in candidate:
        return "the new export records no metrics.eval_loss (train with data.evalSplit above 0)"
    old, new = float(serving["eval_loss"]), float(candidate["eval_loss"])
    limit = old * (1 + max_increase)
    if new > limit:
        rise = (new - old) / old if old > 0 else float("inf")
        return (f"eval_loss {new:.4f} is {rise:+.1%} against the serving model's {old:.4f} ({serving_uri}); "
                f"serving.promotion.maxEvalLossIncrease allows {max_increase:g} (at most {limit:.4f})")
    return None


@dataclass(frozen=True)
class CanaryFigures:
    """A canary's API traffic so far: request and 5xx counts, latency histogram (upper bound → cumulative)."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()

    def __add__(self, other: CanaryFigures) -> CanaryFigures:
        merged: dict[float, float] = dict(self.buckets)
        for bound, count in other.buckets:
            merged[bound] = merged.get(bound, 0.0) + count
        return CanaryFigures(self.requests + other.requests, self.errors + other.errors,
                             tuple(sorted(merged.items())))

    @property
    def error_rate(self) -> float:
        """Share of requests answered 5xx (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile over the buckets, in seconds (None without observations)."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        finite = [bound for bound, _ in self.buckets if bound != float("inf")]
        for bound, cumulative in self.buckets:
            if cumulative >= rank:
                if bound == float("inf"):
                    return finite[-1] if finite else None
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return finite[-1] if finite else None


def parse_figures(text: str) -> CanaryFigures:
    """The API figures of one inference server's `/metrics` text (glmtune_requests, request duration)."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            endpoint = sample.labels.get("endpoint")
            if endpoint is None or endpoint in _NOT_API:
                continue
            if sample.name == "glmtune_requests_total":
                requests += sample.value
                if sample.labels.get("status", "").startswith("5"):
                    errors += sample.value
            elif sample.name == "glmtune_request_duration_seconds_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return CanaryFigures(requests, errors, tuple(sorted(buckets.items())))


def judge(figures: CanaryFigures, canary: CanarySpec) -> str | None:
    """Why the canary's figures break its limits, or None while they hold."""
    if figures.requests and figures.error_rate > canary.max_error_rate:
        return (f"error rate {figures.error_rate:.1%} ({figures.errors:g} of {figures.requests:g} requests "
                f"answered 5xx) exceeds serving.promotion.canary.maxErrorRate {canary.max_error_rate:g}")
    p95 = figures.quantile(0.95)
    if canary.max_p95_latency_ms is not None and p95 is not None and p95 * 1000 > canary.max_p95_latency_ms:
        return (f"p95 latency {p95 * 1000:.0f} ms exceeds serving.promotion.canary.maxP95LatencyMs "
                f"{canary.max_p95_latency_ms}")
    return None


def summary(figures: CanaryFigures) -> str:
    """One line of the canary's figures for the Promoted condition."""
    p95 = figures.quantile(0.95)
    latency = f", p95 {p95 * 1000:.0f} ms" if p95 is not None else ""
    return f"{figures.requests:g} requests, error rate {figures.error_rate:.1%}{latency}"


def sum_figures(parts: Iterable[CanaryFigures]) -> CanaryFigures:
    """The canary's figures over all its pods."""
    total = CanaryFigures()
    for part in parts:
        total = total + part
    return total


def canary_started(verified: Transition, status: Mapping[str, Any], now: datetime, limit: int) -> Transition:
    """The export passed the metrics gate: its canary Deployment was created (phase Canary, stage Starting).

    `verified` is `phases.export_verified`'s transition for serving, whose rollout this replaces."""
    run, uri = status.get("run") or 0, verified.status["candidateUri"]
    conditions = with_condition(verified.status["conditions"], "Promoted", "Unknown", "CanaryStarting",
                                f"canary pods of {uri} starting", now, None)
    return Transition({**verified.status, "phase": CANARY, "rolloutStarted": None, "conditions": conditions,
                       "canaryStage": STARTING, "canaryStarted": timestamp(now), "canaryObservedSince": None,
                       "history": _history(status, run, limit, phase=CANARY, modelUri=uri)},
                      Event("Normal", "CanaryStarted", f"run {run}: canary Deployment of {uri} created"))


def canary_observing(status: Mapping[str, Any], prompts: int, pods: int, now: datetime) -> Transition:
    """The canary pods are ready and answered every golden prompt: watch their metrics from now on."""
    run = status.get("run") or 0
    text = f"{pods} canary pod(s) answered {prompts} golden prompt(s); watching their error rate and latency"
    conditions = with_condition(_conditions(status), "Promoted", "Unknown", "CanaryObserving", text, now, None)
    return Transition({"conditions": conditions, "canaryStage": OBSERVING, "canaryObservedSince": timestamp(now)},
                      Event("Normal", "CanaryObserving", f"run {run}: {text}"))


def canary_passed(status: Mapping[str, Any], figures: str, now: datetime, limit: int) -> Transition:
    """The canary held for the whole duration: promote (phase Deploying: the stable Deployment rolls to it)."""
    run, uri = status.get("run") or 0, status.get("candidateUri")
    text = f"canary passed ({figures}); rolling the inference Deployment to {uri}"
    conditions = with_condition(_conditions(status), "Promoted", "True", "CanaryPassed", text, now, None)
    return Transition({"phase": DEPLOYING, "conditions": conditions, "rolloutStarted": timestamp(now),
                       **CANARY_CLEARED, "history": _history(status, run, limit, phase=DEPLOYING)},
                      Event("Normal", "Promoted", f"run {run}: {text}"))


def promotion_failed(status: Mapping[str, Any], reason: str, why: str, now: datetime, limit: int,
                     uri: str | None = None) -> Transition:
    """The new model failed a gate (`reason` PromotionFailed or CanaryFailed): it is not rolled out and the
    model serving before keeps serving (Serving), or the run fails when there is none."""
    run, previous = status.get("run") or 0, status.get("modelUri")
    uri = uri or status.get("candidateUri")
    text = f"run {run}'s model {uri} was not promoted: {why}"
    conditions = with_condition(_conditions(status), "Promoted", "False", reason, text, now, None)
    if previous:
        text += f"; {previous} kept serving"
        conditions = with_condition(conditions, "RolledBack", "True", reason, text, now, None)
    elif get_condition(status, "Ready") is not None:
        conditions = with_condition(conditions, "Ready", "False", reason, text, now, None)
    return Transition({"phase": SERVING if previous else FAILED, "conditions": conditions, "candidateUri": None,
                       "candidateManifestSha256": None, "rolloutStarted": None, **CANARY_CLEARED,
                       "history": _history(status, run, limit, phase=FAILED, finished=timestamp(now))},
                      Event("Warning", reason, text), "failed")
