"""The status machine, rollout verdicts and data-drop debouncing as pure functions (no server)."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

from glmtune_operator import datawatch, phases, rollout

from glmtune.spec import spec_from_mapping

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=timezone.utc)
SPEC = {"metadata": {"name": "chat"},
        "spec": {"model": {"uri": "s3://models/base"}, "data": {"sources": ["s3://data/x/"]},
                 "output": {"uri": "s3://models/out"}}}


def started(run: int = 1, status: dict | None = None) -> dict:
    status = status or {}
    transition = phases.start_run(status, run=run, job=f"chat-run-{run}", export_uri=f"s3://m/o/run-{run}",
                                  fingerprint="f", generation=1, data_versions={"s3://d/x/a.json": "e1"},
                                  reason="created", suspended=False, now=NOW, limit=10)
    return {**status, **{k: v for k, v in transition.status.items() if v is not None}}


def apply(status: dict, transition: phases.Transition | None) -> dict:
    assert transition is not None
    merged = {**status, **transition.status}
    return {k: v for k, v in merged.items() if v is not None}


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_run_goes_from_job_created_to_serving():
    status = started()
    assert status["phase"] == "Preparing" and status["history"] == [{"run": 1, "phase": "Preparing",
                                                                      "started": "2026-11-24T12:00:00Z"}]
    status = apply(status, phases.observe_job(status, "Running", "", NOW, 10))
    assert status["phase"] == "Training"
    status = apply(status, phases.observe_job(status, "Succeeded", "", NOW, 10))
    assert status["phase"] == "Exporting" and conditions(status)["Trained"] == ("True", "JobSucceeded")
    status = apply(status, phases.export_verified(status, "s3://m/o/run-1", "ab" * 32, True, NOW, 10))
    assert status["phase"] == "Deploying" and status["candidateUri"] == "s3://m/o/run-1"
    assert conditions(status)["Ready"] == ("False", "RollingOut")  # nothing served before the first model
    done = phases.rollout_done(status, NOW, 10)
    status = apply(status, done)
    assert status["phase"] == "Serving" and status["modelUri"] == "s3://m/o/run-1" and done.outcome == "succeeded"
    assert "candidateUri" not in status and status["history"][-1]["phase"] == "Serving"


def test_the_same_job_state_twice_changes_nothing():
    status = apply(started(), phases.observe_job(started(), "Running", "", NOW, 10))
    assert phases.observe_job(status, "Running", "", NOW, 10) is None
    assert phases.observe_job(status, None, "", NOW, 10) is None


def test_a_restarting_job_is_reported_and_a_failed_one_fails_the_run():
    status = apply(started(), phases.observe_job(started(), "Running", "", NOW, 10))
    restarting = phases.observe_job(status, "Restarting", "worker 1 OOMKilled", NOW, 10)
    assert restarting.event.type == "Warning" and apply(status, restarting)["phase"] == "Training"
    failed = phases.observe_job(status, "Failed", "backoff limit reached", NOW, 10)
    status = apply(status, failed)
    assert status["phase"] == "Failed" and failed.outcome == "failed"
    assert conditions(status)["Trained"] == ("False", "JobFailed")
    assert status["history"][-1]["phase"] == "Failed" and "finished" in status["history"][-1]


def test_a_resume_is_not_undone_by_the_jobs_stale_suspended_state():
    """Resumed in the spec (phase back to Preparing) before the job has left Suspended: the stale job state must
    not put the phase back to Suspended, or the resource stays Suspended once the job runs."""
    suspended = apply(started(), phases.observe_job(started(), "Suspended", "", NOW, 10, suspend=True))
    assert suspended["phase"] == "Suspended"
    assert phases.observe_job(suspended, "Running", "", NOW, 10, suspend=True) is None  # the spec holds it
    resumed = apply(suspended, phases.suspension(suspended, False, NOW))
    assert resumed["phase"] == "Preparing"
    assert phases.observe_job(resumed, "Suspended", "", NOW, 10, suspend=False) is None
    assert apply(resumed, phases.observe_job(resumed, "Running", "", NOW, 10, suspend=False))["phase"] == "Training"
    # even a phase left Suspended follows a running job once the spec no longer suspends it
    assert apply(suspended, phases.observe_job(suspended, "Running", "", NOW, 10))["phase"] == "Training"


def test_job_state_prefers_terminal_conditions():
    def job(*true: str) -> dict:
        return {"conditions": [{"type": t, "status": "True"} for t in true] + [{"type": "Running", "status": "False"}]}

    assert phases.job_state(job("Created", "Succeeded")) == ("Succeeded", "")
    assert phases.job_state(job("Created", "Restarting")) == ("Restarting", "")
    assert phases.job_state(job("Created")) == ("Created", "")
    assert phases.job_state(None) == (None, "")


def test_serving_disabled_finishes_as_succeeded():
    status = apply(started(), phases.observe_job(started(), "Succeeded", "", NOW, 10))
    transition = phases.export_verified(status, "s3://m/o/run-1", "cd" * 32, False, NOW, 10)
    assert apply(status, transition)["phase"] == "Succeeded" and transition.outcome == "succeeded"


def test_a_failed_rollout_rolls_back_to_the_previous_model_or_fails_without_one():
    serving = {"phase": "Deploying", "run": 2, "modelUri": "s3://m/o/run-1", "candidateUri": "s3://m/o/run-2",
               "conditions": [{"type": "Ready", "status": "True", "reason": "ModelServing"}]}
    back = apply(serving, phases.rollout_failed(serving, "0/1 new pods ready after 600s", NOW, 10))
    assert back["phase"] == "Serving" and back["modelUri"] == "s3://m/o/run-1" and "candidateUri" not in back
    assert conditions(back)["RolledBack"] == ("True", "ReadyDeadlineExceeded")
    assert conditions(back)["Ready"] == ("True", "ModelServing")
    first = {"phase": "Deploying", "run": 1, "candidateUri": "s3://m/o/run-1", "conditions": []}
    failed = apply(first, phases.rollout_failed(first, "crash loop", NOW, 10))
    assert failed["phase"] == "Failed" and conditions(failed)["Ready"] == ("False", "ReadyDeadlineExceeded")


def test_incomplete_export_waits_then_fails():
    status = apply(started(), phases.observe_job(started(), "Succeeded", "", NOW, 10))
    waiting = phases.export_missing(status, "s3://m/o/run-1", "no glmtune-manifest.json", False, NOW, 10)
    assert "phase" not in waiting.status and waiting.outcome is None
    assert phases.export_missing(apply(status, waiting), "s3://m/o/run-1", "no glmtune-manifest.json", False,
                                 NOW, 10) is None  # already said
    expired = phases.export_missing(status, "s3://m/o/run-1", "no glmtune-manifest.json", True, NOW, 10)
    assert expired.status["phase"] == "Failed" and expired.outcome == "failed"


def test_a_new_run_supersedes_one_in_flight():
    status = started(1)
    second = started(2, status)
    assert [(r["run"], r["phase"]) for r in second["history"]] == [(1, "Failed"), (2, "Preparing")]
    assert second["jobName"] == "chat-run-2"


def test_history_keeps_the_newest_runs():
    status: dict = {}
    for run in range(1, 15):
        status = {**status, **phases.start_run(status, run=run, job=f"j{run}", export_uri="s3://m/o", fingerprint="f",
                                                generation=1, data_versions=None, reason="r", suspended=False,
                                                now=NOW, limit=10).status}
    assert [r["run"] for r in status["history"]] == list(range(5, 15))


def test_condition_transition_time_moves_only_when_the_status_changes():
    later = NOW + timedelta(minutes=5)
    first = phases.with_condition([], "Ready", "True", "ModelServing", "a", NOW, 1)
    same = phases.with_condition(first, "Ready", "True", "ModelServing", "b", later, 2)
    flipped = phases.with_condition(same, "Ready", "False", "RollingOut", "c", later, 2)
    assert same[0]["lastTransitionTime"] == "2026-11-24T12:00:00Z" and same[0]["message"] == "b"
    assert flipped[0]["lastTransitionTime"] == "2026-11-24T12:05:00Z"


def test_invalid_spec_names_the_field_and_forgets_the_trained_fingerprint():
    transition = phases.spec_invalid({"trainingFingerprint": "f"}, "spec.data.sources[0]", "bad scheme", 3, NOW)
    assert transition.status["phase"] == "Failed" and transition.status["trainingFingerprint"] is None
    assert transition.status["conditions"][0]["message"] == "spec.data.sources[0]: bad scheme"
    assert transition.event.type == "Warning"


def test_training_fingerprint_ignores_serving_and_scheduling_fields():
    base = spec_from_mapping(copy.deepcopy(SPEC))
    changed = copy.deepcopy(SPEC)
    changed["spec"].update(serving={"replicas": 4}, runPolicy={"backoffLimit": 9},
                           images={"server": "serve:2"})
    changed["spec"]["data"].update(watch=True, watchIntervalSeconds=30)
    assert phases.training_fingerprint(spec_from_mapping(changed)) == phases.training_fingerprint(base)
    retrain = copy.deepcopy(SPEC)
    retrain["spec"]["training"] = {"learningRate": 1e-5}
    assert phases.training_fingerprint(spec_from_mapping(retrain)) != phases.training_fingerprint(base)
    defaults = copy.deepcopy(SPEC)
    defaults["spec"]["method"] = {"name": "lora", "lora": {"r": 8}}  # defaults written out: same run
    assert phases.training_fingerprint(spec_from_mapping(defaults)) == phases.training_fingerprint(base)


def deployment(uri: str, *, generation=2, observed=2, replicas=2, current=2, updated=2, available=2,
               progressing=None) -> rollout.DeploymentView:
    body = {"metadata": {"generation": generation},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                {"name": "server", "env": [{"name": "GLMTUNE_MODEL_URI", "value": uri}]}]}}},
            "status": {"observedGeneration": observed, "replicas": current, "updatedReplicas": updated,
                       "availableReplicas": available, "conditions": [progressing] if progressing else []}}
    return rollout.deployment_view(body)


def test_rollout_is_done_only_when_every_pod_is_new_and_available():
    start = NOW - timedelta(seconds=30)
    assert rollout.verdict(deployment("s3://r2"), "s3://r2", start, 600, NOW)[0] == rollout.DONE
    assert rollout.verdict(deployment("s3://r2", current=3), "s3://r2", start, 600, NOW)[0] == rollout.WAITING
    assert rollout.verdict(deployment("s3://r2", available=1), "s3://r2", start, 600, NOW)[0] == rollout.WAITING
    assert rollout.verdict(deployment("s3://r2", observed=1), "s3://r2", start, 600, NOW)[0] == rollout.WAITING
    assert rollout.verdict(deployment("s3://r1"), "s3://r2", start, 600, NOW)[0] == rollout.WAITING


def test_rollout_fails_after_the_ready_deadline_or_the_controller_deadline():
    late = NOW - timedelta(seconds=700)
    verdict, why = rollout.verdict(deployment("s3://r2", available=0), "s3://r2", late, 600, NOW)
    assert verdict == rollout.FAILED and "0/2 new pods ready" in why
    stalled = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    assert rollout.verdict(deployment("s3://r2", available=0, progressing=stalled), "s3://r2", NOW, 600,
                           NOW)[0] == rollout.FAILED


def test_a_data_drop_fires_once_after_the_listing_settles():
    watch = datawatch.DropWatch()
    recorded = {"s3://d/a.json": "e1"}
    assert not datawatch.observe(watch, recorded, recorded, 30, now=0)
    uploading = {**recorded, "s3://d/b.json": "e2"}
    assert not datawatch.observe(watch, recorded, uploading, 30, now=10)
    more = {**uploading, "s3://d/c.json": "e3"}  # still uploading: the debounce restarts
    assert not datawatch.observe(watch, recorded, more, 30, now=25)
    assert not datawatch.observe(watch, recorded, more, 30, now=50)
    assert datawatch.observe(watch, recorded, more, 30, now=55)
    assert datawatch.changes(recorded, {"s3://d/a.json": "e9", "s3://d/b.json": "e2"}) == [
        "new s3://d/b.json", "changed s3://d/a.json"]
    assert datawatch.poll_due(watch, 60, now=100) is False and datawatch.poll_due(watch, 60, now=115)
