"""The status machine of a GLMFineTune, as pure functions: observed facts in, the new status out.

Pending → Preparing → Training → Exporting → [Canary →] Deploying → Serving (or Succeeded without serving),
Failed or Suspended on the way; Canary only with `serving.promotion` (see `promotion`). Status keys are the
API's camelCase fields of `GLMFineTuneStatus`; besides what users read (phase, conditions, modelUri, history)
they hold the operator's own bookkeeping: `trainingFingerprint` (which spec a run trained), `exportUri` (where
the current run exports), `candidateUri` / `candidateManifestSha256` / `rolloutStarted` (a rollout in
progress), `canaryStage` / `canaryStarted` / `canaryObservedSince` (a canary in progress) and `dataListedAt`
(when `dataVersions` was listed), so a restarted operator picks up where the last one stopped.
Each function returns a `Transition`: the status fields to write, an Event and the run outcome (metrics).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from glmtune.spec import GLMFineTune

PENDING, PREPARING, TRAINING, EXPORTING, CANARY = "Pending", "Preparing", "Training", "Exporting", "Canary"
DEPLOYING, SERVING, SUCCEEDED, FAILED, SUSPENDED = "Deploying", "Serving", "Succeeded", "Failed", "Suspended"
IN_FLIGHT = frozenset({PENDING, PREPARING, TRAINING})
"""Phases in which the run's PyTorchJob should exist and is watched."""
FINISHED = frozenset({SERVING, SUCCEEDED, FAILED})
"""Phases after which a data drop may start the next run."""

Status = dict[str, Any]
CANARY_CLEARED: Status = {"canaryStage": None, "canaryStarted": None, "canaryObservedSince": None}
"""Status fields that delete a canary's bookkeeping (merge-patch None)."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the GLMFineTune."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Transition:
    """Status fields to write (None deletes a key), an Event, and `outcome` started|succeeded|failed."""

    status: Status
    event: Event | None = None
    outcome: str | None = None


def timestamp(now: datetime) -> str:
    """RFC 3339 UTC, as Kubernetes writes times."""
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """The inverse of `timestamp` (None stays None)."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) if text else None


def training_fingerprint(ft: GLMFineTune) -> str:
    """Hash of every spec field that changes what a run trains; serving and scheduling fields are left out.

    Computed on the validated model (defaults filled in), so server-side defaulting never starts a run.
    """
    spec = ft.to_manifest()["spec"]
    for key in ("serving", "runPolicy"):
        spec.pop(key, None)
    spec.get("images", {}).pop("server", None)
    for key in ("watch", "watchIntervalSeconds"):
        spec["data"].pop(key, None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def with_condition(conditions: list[Mapping[str, Any]], type_: str, status: str, reason: str, message: str,
                   now: datetime, generation: int | None) -> list[dict[str, Any]]:
    """`conditions` with `type_` set; lastTransitionTime only moves when the status value changes."""
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != status
    new = {"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": timestamp(now) if changed else old.get("lastTransitionTime", timestamp(now))}
    if generation is not None:
        new["observedGeneration"] = generation
    return [dict(c) for c in conditions if c.get("type") != type_] + [new]


def get_condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    """The condition of `type_`, if any."""
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def _history(status: Mapping[str, Any], run: int, limit: int, **fields: Any) -> list[dict[str, Any]]:
    """status.history with run `run`'s record created or updated, the newest `limit` kept."""
    records = [dict(r) for r in status.get("history") or []]
    record = next((r for r in records if r.get("run") == run), None)
    if record is None:
        record = {"run": run}
        records.append(record)
    record.update({key: value for key, value in fields.items() if value is not None})
    return records[-limit:]


def _conditions(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(status.get("conditions") or [])


def start_run(status: Mapping[str, Any], *, run: int, job: str, export_uri: str, fingerprint: str,
              generation: int, data_versions: Mapping[str, str] | None, reason: str, suspended: bool,
              now: datetime, limit: int) -> Transition:
    """A new run's job was created: phase Preparing (or Suspended), run record started."""
    conditions = with_condition(_conditions(status), "SpecValid", "True", "Valid", "the spec is valid", now, generation)
    conditions = with_condition(conditions, "Trained", "Unknown", "JobCreated", f"PyTorchJob {job} created",
                                now, generation)
    if get_condition(status, "S3Credentials") is not None:
        conditions = with_condition(conditions, "S3Credentials", "True", "SecretFound", "the S3 Secret exists",
                                    now, generation)
    history = status.get("history") or []
    previous = status.get("run") or 0
    if previous and status.get("phase") in IN_FLIGHT | {EXPORTING, CANARY, DEPLOYING, SUSPENDED}:
        history = _history(status, previous, limit, phase=FAILED, finished=timestamp(now))  # superseded
    phase = SUSPENDED if suspended else PREPARING
    new: Status = {
        "phase": phase, "run": run, "jobName": job, "exportUri": export_uri, "trainingFingerprint": fingerprint,
        "observedGeneration": generation, "conditions": conditions,
        "history": _history({"history": history}, run, limit, phase=phase, started=timestamp(now)),
        "candidateUri": None, "candidateManifestSha256": None, "rolloutStarted": None, **CANARY_CLEARED,
    }
    if data_versions is not None:
        new.update(data_listing(status, data_versions, now))
    return Transition(new, Event("Normal", "RunStarted", f"run {run} started ({reason}): PyTorchJob {job}"),
                      "started")


def data_listing(status: Mapping[str, Any], versions: Mapping[str, str], now: datetime) -> Status:
    """Status fields recording the data listing a run trains on (`dataListedAt` marks it as recorded)."""
    return {"dataVersions": replace_map(status.get("dataVersions") or {}, versions),
            "dataListedAt": timestamp(now)}


def replace_map(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str | None]:
    """A merge-patch value turning map `old` into `new` (removed keys are set to None)."""
    return {**{key: None for key in old if key not in new}, **new}


def spec_invalid(status: Mapping[str, Any], where: str, message: str, generation: int, now: datetime) -> Transition:
    """The spec failed validation: phase Failed with a SpecValid condition naming the field."""
    text = f"{where}: {message}"
    conditions = with_condition(_conditions(status), "SpecValid", "False", "InvalidSpec", text, now, generation)
    # Forget the trained fingerprint so that any valid spec afterwards starts a fresh run.
    return Transition({"phase": FAILED, "conditions": conditions, "observedGeneration": generation,
                       "trainingFingerprint": None}, Event("Warning", "InvalidSpec", text))


def waiting_for_secret(status: Mapping[str, Any], secret: str, generation: int, now: datetime) -> Transition:
    """The S3 Secret the pods need does not exist yet: Pending (the run starts once it appears)."""
    text = f"Secret {secret!r} (spec.s3.secretRef) not found in the namespace; the run starts once it exists"
    conditions = with_condition(_conditions(status), "S3Credentials", "False", "SecretMissing", text, now,
                                generation)
    return Transition({"phase": PENDING, "conditions": conditions}, Event("Warning", "SecretMissing", text))


def job_state(job_status: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """(state, message) from a PyTorchJob's conditions: Succeeded/Failed win, then Suspended, Restarting,
    Running, Created; (None, '') before the training operator wrote any."""
    conditions = {c.get("type"): c for c in (job_status or {}).get("conditions") or [] if c.get("status") == "True"}
    for state in ("Succeeded", "Failed", "Suspended", "Restarting", "Running", "Created"):
        if state in conditions:
            return state, conditions[state].get("message") or ""
    return None, ""


def observe_job(status: Mapping[str, Any], state: str | None, message: str, now: datetime,
                limit: int, suspend: bool = False) -> Transition | None:
    """The phase the job's state implies given the spec's `runPolicy.suspend`, or None when nothing changes."""
    phase, run, job = status.get("phase"), status.get("run") or 0, status.get("jobName")
    conditions = _conditions(status)
    if suspend and phase == SUSPENDED and state not in ("Succeeded", "Failed"):
        return None  # suspended by the spec: the job's own state does not resume it
    if state == "Suspended" and not suspend:
        # A resume the job has not caught up with yet: taking its stale Suspended would undo the resume and, with
        # the check above, leave the resource Suspended for good once the job runs.
        return None
    if state == "Succeeded":
        conditions = with_condition(conditions, "Trained", "True", "JobSucceeded", f"PyTorchJob {job} succeeded",
                                    now, None)
        conditions = with_condition(conditions, "Exported", "Unknown", "Checking",
                                    f"checking {status.get('exportUri')}", now, None)
        return Transition({"phase": EXPORTING, "conditions": conditions,
                           "history": _history(status, run, limit, phase=EXPORTING)},
                          Event("Normal", "Exporting", f"run {run} trained; checking the export manifest"))
    if state == "Failed":
        text = f"PyTorchJob {job} failed: {message}".rstrip(": ")
        conditions = with_condition(conditions, "Trained", "False", "JobFailed", text, now, None)
        return Transition({"phase": FAILED, "conditions": conditions,
                           "history": _history(status, run, limit, phase=FAILED, finished=timestamp(now))},
                          Event("Warning", "TrainingFailed", text), "failed")
    wanted = {"Created": PREPARING, "Running": TRAINING, "Restarting": TRAINING, "Suspended": SUSPENDED}.get(state)
    if wanted is None or (wanted == phase and state != "Restarting"):
        return None
    reason = {"Created": "JobCreated", "Running": "Running", "Restarting": "Restarting",
              "Suspended": "Suspended"}[state]
    old = get_condition(status, "Trained")
    if wanted == phase and old is not None and old.get("reason") == reason:
        return None
    conditions = with_condition(conditions, "Trained", "Unknown", reason, message or f"PyTorchJob {job}: {state}",
                                now, None)
    event_type = "Warning" if state == "Restarting" else "Normal"
    return Transition({"phase": wanted, "conditions": conditions,
                       "history": _history(status, run, limit, phase=wanted)},
                      Event(event_type, wanted if state != "Restarting" else "Restarting",
                            f"run {run}: PyTorchJob {job} is {state.lower()}"))


def export_verified(status: Mapping[str, Any], uri: str, sha256: str | None, serving: bool, now: datetime,
                    limit: int, report_uri: str | None = None) -> Transition:
    """The export is complete: roll it out (Deploying), or finish (Succeeded) when serving is off.

    `report_uri`: the export's training report, when it has one (recorded as `reportUri`, else cleared)."""
    run = status.get("run") or 0
    detail = f"manifest sha256 {sha256}" if sha256 else "not verifiable from the operator (pvc:// output)"
    conditions = with_condition(_conditions(status), "Exported", "True", "ManifestVerified", f"{uri}: {detail}",
                                now, None)
    if not serving:
        return Transition({"phase": SUCCEEDED, "conditions": conditions, "modelUri": uri,
                           "modelManifestSha256": sha256, "reportUri": report_uri,
                           "history": _history(status, run, limit, phase=SUCCEEDED, modelUri=uri,
                                               finished=timestamp(now))},
                          Event("Normal", "Succeeded", f"run {run} exported {uri}"), "succeeded")
    if not status.get("modelUri"):
        conditions = with_condition(conditions, "Ready", "False", "RollingOut", f"starting servers for {uri}",
                                    now, None)
    return Transition({"phase": DEPLOYING, "conditions": conditions, "candidateUri": uri,
                       "candidateManifestSha256": sha256, "rolloutStarted": timestamp(now), "reportUri": report_uri,
                       "history": _history(status, run, limit, phase=DEPLOYING, modelUri=uri)},
                      Event("Normal", "Deploying", f"run {run}: rolling the inference Deployment to {uri}"))


def export_refused(status: Mapping[str, Any], uri: str, why: str, now: datetime, limit: int) -> Transition:
    """A complete export that must not be served (e.g. an adapter over a base with another fingerprint): the
    model serving before keeps serving, or the run fails when there is none."""
    run, previous = status.get("run") or 0, status.get("modelUri")
    text = f"run {run}'s export {uri} is not rolled out: {why}"
    conditions = with_condition(_conditions(status), "Exported", "False", "BaseMismatch", text, now, None)
    if previous:
        conditions = with_condition(conditions, "RolledBack", "True", "BaseMismatch", f"{text}; {previous} kept "
                                    "serving", now, None)
    return Transition({"phase": SERVING if previous else FAILED, "conditions": conditions,
                       "history": _history(status, run, limit, phase=FAILED, finished=timestamp(now))},
                      Event("Warning", "BaseMismatch", text), "failed")


def export_missing(status: Mapping[str, Any], uri: str, problem: str, expired: bool, now: datetime,
                   limit: int) -> Transition | None:
    """The export is not complete yet; after the grace period the run fails."""
    run = status.get("run") or 0
    text = f"{uri}: {problem}"
    conditions = with_condition(_conditions(status), "Exported", "False",
                                "ExportIncomplete" if expired else "ManifestMissing", text, now, None)
    if not expired:
        old = get_condition(status, "Exported")
        if old is not None and old.get("message") == text:
            return None
        return Transition({"conditions": conditions})
    return Transition({"phase": FAILED, "conditions": conditions,
                       "history": _history(status, run, limit, phase=FAILED, finished=timestamp(now))},
                      Event("Warning", "ExportIncomplete", text), "failed")


def rollout_done(status: Mapping[str, Any], now: datetime, limit: int) -> Transition:
    """Every inference pod runs the new model and is ready: Serving it."""
    run, uri = status.get("run") or 0, status.get("candidateUri")
    conditions = with_condition(_conditions(status), "Ready", "True", "ModelServing", f"serving {uri}", now, None)
    if get_condition(status, "RolledBack") is not None:
        conditions = with_condition(conditions, "RolledBack", "False", "RolloutSucceeded", f"run {run} is serving",
                                    now, None)
    return Transition({"phase": SERVING, "conditions": conditions, "modelUri": uri,
                       "modelManifestSha256": status.get("candidateManifestSha256"), "candidateUri": None,
                       "candidateManifestSha256": None, "rolloutStarted": None,
                       "history": _history(status, run, limit, phase=SERVING, finished=timestamp(now))},
                      Event("Normal", "Serving", f"run {run}: all inference pods serve {uri}"), "succeeded")


def rollout_failed(status: Mapping[str, Any], why: str, now: datetime, limit: int) -> Transition:
    """The new model did not become ready in time: back to the previous model, or Failed without one."""
    run, uri, previous = status.get("run") or 0, status.get("candidateUri"), status.get("modelUri")
    text = f"run {run}'s model {uri} did not become ready: {why}"
    conditions = _conditions(status)
    if previous:
        text += f"; rolled back to {previous}, which kept serving"
        conditions = with_condition(conditions, "RolledBack", "True", "ReadyDeadlineExceeded", text, now, None)
        conditions = with_condition(conditions, "Ready", "True", "ModelServing", f"serving {previous}", now, None)
    else:
        conditions = with_condition(conditions, "Ready", "False", "ReadyDeadlineExceeded", text, now, None)
    return Transition({"phase": SERVING if previous else FAILED, "conditions": conditions, "candidateUri": None,
                       "candidateManifestSha256": None, "rolloutStarted": None,
                       "history": _history(status, run, limit, phase=FAILED, finished=timestamp(now))},
                      Event("Warning", "RolloutFailed", text), "failed")


def suspension(status: Mapping[str, Any], suspend: bool, now: datetime) -> Transition | None:
    """runPolicy.suspend toggled while a run is in flight: Suspended, or back to Preparing."""
    phase = status.get("phase")
    if suspend and phase in IN_FLIGHT:
        return Transition({"phase": SUSPENDED}, Event("Normal", "Suspended", "training suspended"))
    if not suspend and phase == SUSPENDED:
        return Transition({"phase": PREPARING}, Event("Normal", "Resumed", "training resumed"))
    return None
