"""What the handlers do: start runs, keep children in place, and move each GLMFineTune along its phases.

`reconcile_spec` runs on create/resume/update: it validates the spec, starts a run when the training
fields changed (new job name with the run number) and keeps serving in sync (serving-only changes just
patch the Deployment). `advance` runs on a timer from in-memory indexes of the children: job state →
phase, export manifest check in S3, the canary of `serving.promotion` (the one step that reads the API: it
lists the canary pods to talk to them), health-gated rollout with rollback, and S3 data drops.
Every status write carries the resourceVersion it was computed from; a stale one is retried, never merged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kopf

from glmtune import storage
from glmtune.errors import GlmtuneError
from glmtune.spec import GLMFineTune, SpecError, spec_from_mapping
from glmtune_operator import builders, canary, datawatch, metrics, names, phases, promotion, rollout, s3check
from glmtune_operator.kube import KubeApi, Stale
from glmtune_operator.settings import OperatorSettings

LOG = logging.getLogger("glmtune_operator")


@dataclass
class Operator:
    """Shared by every handler call: API access and settings (S3 clients are cached by `glmtune.storage`)."""

    api: KubeApi
    settings: OperatorSettings


@dataclass
class Memory:
    """Per-resource memory across handler calls (kept in kopf's per-object memo)."""

    drops: datawatch.DropWatch = field(default_factory=datawatch.DropWatch)
    written_over: str | None = None
    """The resourceVersion our last status write replaced: a body still at it is older than our write."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def owner_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a GLMFineTune that `kopf.adopt` needs to make it the owner of a child."""
    meta = body["metadata"]
    return {"apiVersion": body["apiVersion"], "kind": body["kind"],
            "metadata": {key: meta.get(key) for key in ("name", "namespace", "uid")} |
            {"labels": dict(meta.get("labels") or {})}}


def _field_path(where: str | None) -> str:
    match = re.search(r"\(([^()]*)\)\s*$", where or "")
    return match.group(1) if match else (where or "spec")


def write(op: Operator, body: Mapping[str, Any], memory: Memory, transition: phases.Transition) -> bool:
    """Write a transition's status (precondition: the body's resourceVersion), post its Event, count it."""
    meta = body["metadata"]
    try:
        op.api.patch_status(meta["namespace"], meta["name"], transition.status, meta["resourceVersion"])
    except Stale:
        return False
    memory.written_over = meta["resourceVersion"]
    if transition.event is not None:
        kopf.event(body, type=transition.event.type, reason=transition.event.reason,
                   message=transition.event.message)
    if transition.outcome is not None:
        metrics.count_run(meta["namespace"], transition.outcome)
    return True


def _write_or_retry(op: Operator, body: Mapping[str, Any], memory: Memory,
                    transition: phases.Transition) -> dict[str, Any]:
    """`write`, or a kopf retry on the newer version; returns the status as written."""
    if not write(op, body, memory, transition):
        raise kopf.TemporaryError("the GLMFineTune changed while being handled; retrying on the new version",
                                  delay=1)
    merged = {**(body.get("status") or {}), **transition.status}
    return {key: value for key, value in merged.items() if value is not None}


class SecretMissing(Exception):
    """The Secret named by spec.s3.secretRef does not exist."""


def s3_client(op: Operator, ft: GLMFineTune, namespace: str) -> Any:
    """A boto3 client with this resource's endpoint and Secret credentials (reads the Secret)."""
    ref = ft.spec.s3.secret_ref
    secret = op.api.secret_data(namespace, ref.name) if ref is not None else None
    if ref is not None and secret is None:
        raise SecretMissing(ref.name)
    return storage.s3_client(s3check.access_for(ft.spec.s3, secret, op.settings.s3_endpoint))


def reconcile_spec(op: Operator, body: Mapping[str, Any], memory: Memory, reason: str) -> None:
    """create/resume/update: validate, start a run if the training fields changed, keep serving in sync."""
    meta, status = body["metadata"], dict(body.get("status") or {})
    try:
        ft = spec_from_mapping(body, source=f"{meta['namespace']}/{meta['name']}")
    except SpecError as exc:
        where, message = exc.problems[0]
        old = phases.get_condition(status, "SpecValid")
        transition = phases.spec_invalid(status, _field_path(where), message, meta.get("generation", 0), _now())
        if status.get("phase") != phases.FAILED or not old or old.get("message") != transition.event.message:
            _write_or_retry(op, body, memory, transition)
        return
    if phases.training_fingerprint(ft) != status.get("trainingFingerprint"):
        status = start_run(op, body, memory, ft, reason)
    else:
        status = keep_run(op, body, memory, ft)
    sync_serving(op, body, ft, status)


def _data_versions(op: Operator, ft: GLMFineTune, namespace: str, client: Any = None) -> dict[str, str] | None:
    """The data listing a new run trains on (None when S3 cannot tell now; the watcher records it later)."""
    try:
        return s3check.list_data_versions(client or s3_client(op, ft, namespace), ft.spec.data.sources)
    except (GlmtuneError, SecretMissing) as exc:  # S3Unavailable, or a bucket that is missing or refused
        LOG.warning("cannot list the data of %s/%s: %s", namespace, ft.name, exc)
        return None


def start_run(op: Operator, body: Mapping[str, Any], memory: Memory, ft: GLMFineTune, reason: str,
              versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Create run N+1's ConfigMap and PyTorchJob (adopting any left by an interrupted attempt), then record it.

    A run still in flight is superseded: its job is deleted. Returns the status as written."""
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, run = meta["namespace"], (status.get("run") or 0) + 1
    owner = owner_of(body)
    try:
        client = s3_client(op, ft, namespace)  # the pods cannot start without the Secret either
    except SecretMissing as exc:
        if status.get("phase") != phases.PENDING:
            write(op, body, memory, phases.waiting_for_secret(status, str(exc), meta.get("generation", 0), _now()))
        raise kopf.TemporaryError(f"waiting for Secret {exc}", delay=10) from exc
    if status.get("jobName") and status.get("phase") in phases.IN_FLIGHT | {phases.SUSPENDED}:
        op.api.delete({"kind": "PyTorchJob", "metadata": {"name": status["jobName"], "namespace": namespace}})
    if versions is None and ft.spec.data.watch:
        versions = _data_versions(op, ft, namespace, client)
    op.api.ensure(builders.build_config_map(ft, owner, run))
    job, _ = op.api.ensure(builders.build_pytorchjob(ft, owner, run, op.settings))
    transition = phases.start_run(
        status, run=run, job=job["metadata"]["name"],
        export_uri=builders.run_output_uri(ft.spec.output.uri, run),
        fingerprint=phases.training_fingerprint(ft), generation=meta.get("generation", 0),
        data_versions=versions, reason=reason, suspended=ft.spec.run_policy.suspend, now=_now(),
        limit=op.settings.history_limit)
    return _write_or_retry(op, body, memory, transition)


def keep_run(op: Operator, body: Mapping[str, Any], memory: Memory, ft: GLMFineTune) -> dict[str, Any]:
    """Same training spec: re-adopt the current run's children (operator restart), apply suspend/resume."""
    meta, status = body["metadata"], dict(body.get("status") or {})
    changes: dict[str, Any] = {}
    event = None
    if status.get("phase") in phases.IN_FLIGHT | {phases.SUSPENDED} and status.get("jobName"):
        owner, run = owner_of(body), status.get("run") or 0
        op.api.ensure(builders.build_config_map(ft, owner, run))
        op.api.ensure(builders.build_pytorchjob(ft, owner, run, op.settings))
        suspend = ft.spec.run_policy.suspend
        if (toggle := phases.suspension(status, suspend, _now())) is not None:
            op.api.patch_job(meta["namespace"], status["jobName"], {"spec": {"runPolicy": {"suspend": suspend}}})
            changes.update(toggle.status)
            event = toggle.event
    if status.get("observedGeneration") != meta.get("generation"):
        changes["observedGeneration"] = meta.get("generation")
    if changes:
        return _write_or_retry(op, body, memory, phases.Transition(changes, event))
    return status


def _run_of(status: Mapping[str, Any], uri: str) -> int:
    record = next((r for r in status.get("history") or [] if r.get("modelUri") == uri), None)
    return int(record["run"]) if record else int(status.get("run") or 0)


def sync_serving(op: Operator, body: Mapping[str, Any], ft: GLMFineTune, status: Mapping[str, Any]) -> None:
    """Serving follows the spec: Service always, Deployment once a model exists; removed when disabled.

    The Deployment serves the model being rolled out while Deploying, else the last good one (so a run
    that supersedes a rollout puts the servers back on the model that passed its health gate)."""
    owner = owner_of(body)
    uri = status.get("candidateUri") if status.get("phase") == phases.DEPLOYING else status.get("modelUri")
    if not ft.spec.serving.enabled:
        if uri:
            where = {"name": names.server_name(ft.name), "namespace": body["metadata"]["namespace"]}
            op.api.delete({"kind": "Deployment", "metadata": where})
            op.api.delete({"kind": "Service", "metadata": where})
            op.api.delete({"kind": "Deployment", "metadata": {**where, "name": names.canary_name(ft.name)}})
        return
    op.api.apply(builders.build_service(ft, owner))
    if uri:
        op.api.apply(builders.build_deployment(ft, owner, uri, _run_of(status, uri), op.settings))
    where = {"name": names.canary_name(ft.name), "namespace": body["metadata"]["namespace"]}
    candidate = status.get("candidateUri")
    if status.get("phase") == phases.CANARY and candidate and ft.spec.serving.promotion is not None:
        # `ensure`, not `apply`: a resumed operator adopts the running canary as it is and never restarts it.
        op.api.ensure(builders.build_canary_deployment(ft, owner, candidate, _run_of(status, candidate),
                                                       op.settings))
    elif status.get("phase") != phases.DEPLOYING:
        op.api.delete({"kind": "Deployment", "metadata": where})  # left by a canary a new run superseded


def advance(op: Operator, body: Mapping[str, Any], memory: Memory, jobs: Any, deployments: Any) -> None:
    """One progress step from what the indexes saw of the children (no API reads unless S3 is involved)."""
    meta, status = body["metadata"], dict(body.get("status") or {})
    if memory.written_over == meta.get("resourceVersion"):
        return  # our last write has not come back through the watch yet
    try:
        ft = spec_from_mapping(body, source=f"{meta['namespace']}/{meta['name']}")
    except SpecError:
        return  # reconcile_spec reported it
    phase, now, limit = status.get("phase"), _now(), op.settings.history_limit
    transition = None
    if phase in phases.IN_FLIGHT | {phases.SUSPENDED}:
        state, message = _first(jobs, (meta["namespace"], status.get("jobName"))) or (None, "")
        transition = phases.observe_job(status, state, message, now, limit, suspend=ft.spec.run_policy.suspend)
    elif phase == phases.EXPORTING:
        transition = _check_export(op, body, ft, status, now)
    elif phase == phases.CANARY:
        transition = _check_canary(op, body, ft, status, deployments, now)
    elif phase == phases.DEPLOYING:
        transition = _check_rollout(op, body, ft, status, deployments, now)
    elif phase in phases.FINISHED and ft.spec.data.watch:
        _watch_data(op, body, memory, ft, status)
    if transition is not None:
        write(op, body, memory, transition)


def _first(index: Any, key: tuple) -> Any:
    store = index.get(key) if index is not None else None
    return next(iter(store), None) if store is not None else None


def _check_export(op: Operator, body: Mapping[str, Any], ft: GLMFineTune, status: Mapping[str, Any],
                  now: datetime) -> phases.Transition | None:
    uri = status.get("exportUri") or builders.run_output_uri(ft.spec.output.uri, status.get("run") or 0)
    try:
        client = s3_client(op, ft, body["metadata"]["namespace"])
        check = s3check.verify_export(client, uri)
    except (s3check.S3Unavailable, SecretMissing) as exc:
        raise kopf.TemporaryError(str(exc), delay=10) from exc
    limit = op.settings.history_limit
    if check.complete:
        serving = ft.spec.serving.enabled
        try:
            facts = s3check.export_facts(client, uri)
            mismatch = s3check.base_mismatch(client, uri, facts.info) if serving else None
        except s3check.S3Unavailable as exc:
            raise kopf.TemporaryError(str(exc), delay=10) from exc
        if mismatch:
            return phases.export_refused(status, uri, mismatch, now, limit)
        verified = phases.export_verified(status, uri, check.manifest_sha256, serving, now, limit, facts.report_uri)
        if serving and ft.spec.serving.promotion is not None:
            return _start_canary(op, body, ft, status, client, facts, verified, now)
        if serving:
            owner = owner_of(body)
            op.api.apply(builders.build_service(ft, owner))
            op.api.apply(builders.build_deployment(ft, owner, uri, status.get("run") or 0, op.settings))
        return verified
    trained = phases.parse_time((phases.get_condition(status, "Trained") or {}).get("lastTransitionTime"))
    expired = trained is not None and (now - trained).total_seconds() > op.settings.export_grace_seconds
    return phases.export_missing(status, uri, check.problem, expired, now, limit)


def _check_rollout(op: Operator, body: Mapping[str, Any], ft: GLMFineTune, status: Mapping[str, Any],
                   deployments: Any, now: datetime) -> phases.Transition | None:
    candidate = status.get("candidateUri") or ""
    view = _first(deployments, (body["metadata"]["namespace"], names.server_name(ft.name)))
    started = phases.parse_time(status.get("rolloutStarted")) or now
    verdict, why = rollout.verdict(view, builders.localize(candidate), started,
                                   ft.spec.serving.ready_deadline_seconds, now)
    if verdict != rollout.WAITING and _first(deployments, (body["metadata"]["namespace"], names.canary_name(ft.name))):
        # The canary served the candidate until the stable pods took over (or gave up): it goes either way.
        op.api.delete({"kind": "Deployment", "metadata": {"name": names.canary_name(ft.name),
                                                          "namespace": body["metadata"]["namespace"]}})
    if verdict == rollout.DONE:
        return phases.rollout_done(status, now, op.settings.history_limit)
    if verdict == rollout.FAILED:
        previous = status.get("modelUri")
        if previous:
            op.api.apply(builders.build_deployment(ft, owner_of(body), previous, _run_of(status, previous),
                                                   op.settings))
        return phases.rollout_failed(status, why, now, op.settings.history_limit)
    return None


def _start_canary(op: Operator, body: Mapping[str, Any], ft: GLMFineTune, status: Mapping[str, Any],
                  client: Any, facts: s3check.ExportFacts, verified: phases.Transition,
                  now: datetime) -> phases.Transition:
    """Metrics gate against the serving model's export, then the canary Deployment of the new export."""
    uri, limit, spec = verified.status["candidateUri"], op.settings.history_limit, ft.spec.serving.promotion
    serving_uri = status.get("modelUri")
    serving = None
    if serving_uri and spec.max_eval_loss_increase is not None:
        try:
            serving = s3check.export_facts(client, serving_uri).metrics
        except s3check.S3Unavailable as exc:
            raise kopf.TemporaryError(str(exc), delay=10) from exc
    problem = promotion.eval_gate(facts.metrics, serving, spec.max_eval_loss_increase, serving_uri)
    if problem is not None:
        merged = {**status, **verified.status}
        failed = promotion.promotion_failed(merged, promotion.PROMOTION_FAILED, problem, now, limit, uri)
        return phases.Transition({**verified.status, **failed.status}, failed.event, failed.outcome)
    owner = owner_of(body)
    op.api.apply(builders.build_service(ft, owner))
    op.api.ensure(builders.build_canary_deployment(ft, owner, uri, status.get("run") or 0, op.settings))
    return promotion.canary_started(verified, status, now, limit)


def _check_canary(op: Operator, body: Mapping[str, Any], ft: GLMFineTune, status: Mapping[str, Any],
                  deployments: Any, now: datetime) -> phases.Transition | None:
    namespace = body["metadata"]["namespace"]
    view = _first(deployments, (namespace, names.canary_name(ft.name)))
    ref = ft.spec.serving.api_key_secret
    asks = ref is not None and status.get("canaryStage") != promotion.OBSERVING  # golden prompts not yet passed
    api_key = (op.api.secret_data(namespace, ref.name) or {}).get(ref.key) if asks else None
    transition, action = canary.step(op.api, ft, namespace, status, view, now, op.settings.history_limit, api_key)
    if action == canary.REMOVE:
        op.api.delete({"kind": "Deployment", "metadata": {"name": names.canary_name(ft.name), "namespace": namespace}})
    elif action == canary.PROMOTE:
        uri = status.get("candidateUri") or ""
        op.api.apply(builders.build_deployment(ft, owner_of(body), uri, _run_of(status, uri), op.settings))
    return transition


def _watch_data(op: Operator, body: Mapping[str, Any], memory: Memory, ft: GLMFineTune,
                status: Mapping[str, Any]) -> None:
    clock = time.monotonic()
    if not datawatch.poll_due(memory.drops, ft.spec.data.watch_interval_seconds, clock):
        return
    current = _data_versions(op, ft, body["metadata"]["namespace"])
    if current is None:
        memory.drops.last_poll = clock
        return
    if not status.get("dataListedAt"):  # watching started after the run: today's data is the baseline
        memory.drops.last_poll = clock
        write(op, body, memory, phases.Transition(phases.data_listing(status, current, _now())))
        return
    recorded = status.get("dataVersions") or {}
    if datawatch.observe(memory.drops, recorded, current, op.settings.data_debounce_seconds, clock):
        what = datawatch.changes(recorded, current)
        reason = "data changed: " + ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "")
        start_run(op, body, memory, ft, reason, versions=current)
        memory.drops.pending = None
