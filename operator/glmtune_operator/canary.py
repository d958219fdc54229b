"""One progress step of a canary (phase Canary), with its I/O: reading the canary pods from the API and
talking to each of them directly (Pod IP and its `http` container port), never through the Service, so the
golden prompts and the metrics are the canary's own. The decisions are `promotion`'s.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from glmtune.spec import GLMFineTune
from glmtune_operator import builders, names, phases, promotion, rollout
from glmtune_operator.phases import Transition

PROMOTE, REMOVE = "promote", "remove"
PROMPT_TIMEOUT_SECONDS = 120.0
SCRAPE_TIMEOUT_SECONDS = 10.0


class PodUnreachable(Exception):
    """A canary pod did not answer at all (connection refused, reset, timeout): try again on the next step."""


class AnswerRefused(Exception):
    """A canary pod answered an HTTP error status."""

    def __init__(self, code: int, body: str) -> None:
        self.code, self.body = code, body
        super().__init__(f"HTTP {code}: {body[:300]}")


@dataclass(frozen=True)
class CanaryPod:
    """A Ready canary pod and the base URL of its API."""

    name: str
    url: str


def ready_pods(api: Any, namespace: str, resource_name: str) -> list[CanaryPod]:
    """The canary pods that are Ready and have an IP, by name."""
    found = []
    for pod in api.list_pods(namespace, names.canary_selector(resource_name)):
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if meta.get("deletionTimestamp") or not ready or not status.get("podIP"):
            continue
        containers = (pod.get("spec") or {}).get("containers") or []
        server = next((c for c in containers if c.get("name") == builders.SERVER_CONTAINER), {})
        port = next((p.get("containerPort") for p in server.get("ports") or [] if p.get("name") == "http"), None)
        if port:
            found.append(CanaryPod(meta["name"], f"http://{status['podIP']}:{port}"))
    return sorted(found, key=lambda pod: pod.name)


def _request(url: str, body: Mapping[str, Any] | None, headers: Mapping[str, str], timeout: float) -> str:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (http:// to a pod)
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise AnswerRefused(exc.code, exc.read().decode("utf-8", errors="replace")) from None
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out
        raise PodUnreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None


def ask(pod: CanaryPod, model: str, prompt: Any, api_key: str | None) -> str:
    """The pod's answer to one golden prompt (temperature 0, so the same model answers the same)."""
    body = {"model": model, "messages": [m.model_dump() for m in prompt.messages],
            "max_tokens": prompt.max_tokens, "temperature": 0}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = _request(f"{pod.url}/v1/chat/completions", body, headers, PROMPT_TIMEOUT_SECONDS)
    try:
        return str(json.loads(text)["choices"][0]["message"]["content"] or "")
    except (ValueError, KeyError, IndexError, TypeError):
        raise AnswerRefused(200, f"not an OpenAI chat completion: {text[:300]}") from None


def scrape(pod: CanaryPod) -> promotion.CanaryFigures:
    """The pod's API figures from its `/metrics`."""
    return promotion.parse_figures(_request(f"{pod.url}/metrics", None, {}, SCRAPE_TIMEOUT_SECONDS))


def step(api: Any, ft: GLMFineTune, namespace: str, status: Mapping[str, Any], view: Any, now: datetime,
         limit: int, api_key: str | None) -> tuple[Transition | None, str | None]:
    """The canary's next transition and what the caller must do first: PROMOTE (roll the stable Deployment to
    the candidate), REMOVE (delete the canary Deployment) or nothing."""
    spec = ft.spec.serving.promotion
    if spec is None:  # the gates were removed from the spec while the canary ran: nothing left to wait for
        return promotion.canary_passed(status, "serving.promotion was removed", now, limit), PROMOTE
    canary, candidate = spec.canary, status.get("candidateUri") or ""
    on_candidate = view is not None and view.model_uri == builders.localize(candidate)
    available = view.available_replicas if on_candidate else 0

    def fail(reason: str, why: str) -> tuple[Transition, str]:
        return promotion.promotion_failed(status, reason, why, now, limit), REMOVE

    if status.get("canaryStage") == promotion.OBSERVING:
        since = phases.parse_time(status.get("canaryObservedSince")) or now
        if available < canary.replicas:
            return fail(promotion.CANARY_FAILED, f"only {available}/{canary.replicas} canary pods stayed ready")
        figures, unreadable = [], []
        for pod in ready_pods(api, namespace, ft.name):
            try:
                figures.append(scrape(pod))
            except (PodUnreachable, AnswerRefused, ValueError) as exc:
                unreadable.append(f"cannot read /metrics of canary pod {pod.name}: {exc}")
        total = promotion.sum_figures(figures)
        if problem := promotion.judge(total, canary):
            return fail(promotion.CANARY_FAILED, problem)
        if (now - since).total_seconds() < canary.duration_seconds:
            return None, None
        if unreadable:
            return fail(promotion.CANARY_FAILED, unreadable[0])
        return promotion.canary_passed(status, promotion.summary(total), now, limit), PROMOTE
    waited = (now - (phases.parse_time(status.get("canaryStarted")) or now)).total_seconds()
    deadline = ft.spec.serving.ready_deadline_seconds
    if on_candidate and rollout.is_complete(view):
        pods = ready_pods(api, namespace, ft.name)
        if len(pods) >= canary.replicas:
            model = builders.serving_model_name(ft)
            try:
                for pod in pods:
                    for index, prompt in enumerate(spec.golden_prompts):
                        name = spec.prompt_name(index)
                        try:
                            answer = ask(pod, model, prompt, api_key)
                        except AnswerRefused as exc:
                            return fail(promotion.PROMOTION_FAILED,
                                        f"golden prompt {name!r} on canary pod {pod.name}: {exc}")
                        if problem := prompt.expect.problem(answer):
                            return fail(promotion.PROMOTION_FAILED, f"golden prompt {name!r} on canary pod "
                                        f"{pod.name} answered {answer!r}; {problem}")
            except PodUnreachable as exc:
                if waited > deadline:
                    return fail(promotion.CANARY_FAILED, f"a canary pod does not answer: {exc}")
                return None, None
            return promotion.canary_observing(status, len(spec.golden_prompts), len(pods), now), None
    if (on_candidate and view.deadline_exceeded) or waited > deadline:
        return fail(promotion.CANARY_FAILED, f"{available}/{canary.replicas} canary pods ready after {waited:.0f}s "
                                             f"(serving.readyDeadlineSeconds={deadline})")
    return None, None
