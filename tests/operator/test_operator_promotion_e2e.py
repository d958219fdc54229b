"""serving.promotion end to end: the operator for real (kopf) against the API emulator and moto S3.

The metrics gate runs on exports the test puts into S3 (no pods). The canary runs on a real trained model:
the harness trains it with the trainer, runs the canary and stable `glmtune serve` pods as processes (and as
Pod objects the operator reads to reach the canary pods directly), and injects a server fault for one model.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from operator_testkit import (
    FT,
    NAMESPACE,
    assert_chart_rbac_covers_operator,
    finetune,
    get_ft,
    patch_spec,
    phase_of,
    upload_export,
    wait_for,
)
from test_operator_e2e import ANSWER, MEMORISE, QUESTION, chat
from test_operator_lifecycle import EXPORT, deployment, make_spec

pytestmark = pytest.mark.slow


def export_files(eval_loss: float, report: bool) -> dict[str, bytes]:
    info = {"format": 1, "kind": "merged", "family": "v2", "template": "v2", "method": "lora",
            "metrics": {"eval_loss": eval_loss}}
    files = {**EXPORT, "glmtune-export.json": json.dumps(info).encode()}
    if report:
        files["report.html"] = b"<!doctype html><title>report</title>"
    return files


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def events(cluster, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.live("v1/events", NAMESPACE) if e.get("reason") == reason
            and e.get("involvedObject", {}).get("name") == "chat"]


def test_a_model_whose_eval_loss_rose_too_much_is_not_rolled_out(cluster, operator, harness, s3, new_bucket,
                                                                   moto_endpoint, s3_secret):
    bucket = new_bucket("gate")
    operator()
    kube = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    run_1 = f"s3://{bucket}/models/chat/run-1"
    wait_for(lambda: "chat-run-1" in kube.jobs and phase_of(cluster, "chat") == "Training", 30, "run 1 training")
    upload_export(s3, run_1, export_files(1.0, report=True))
    kube.finish_job("chat-run-1", "Succeeded")
    wait_for(lambda: phase_of(cluster, "chat") == "Serving", 60, "run 1 serving")
    assert get_ft(cluster, "chat")["status"]["reportUri"] == f"{run_1}/report.html"

    patch_spec(cluster, "chat", {"training": {"maxSteps": 7}, "data": {"evalSplit": 0.1},  # the gate needs held-out data
                                "serving": {"promotion": {"maxEvalLossIncrease": 0.1}}})
    wait_for(lambda: "chat-run-2" in kube.jobs and phase_of(cluster, "chat") == "Training", 30, "run 2 training")
    upload_export(s3, f"s3://{bucket}/models/chat/run-2", export_files(1.5, report=False))
    kube.finish_job("chat-run-2", "Succeeded")
    wait_for(lambda: condition(get_ft(cluster, "chat")["status"], "Promoted").get("status") == "False", 60,
             "the metrics gate")
    status = get_ft(cluster, "chat")["status"]
    promoted = condition(status, "Promoted")
    assert promoted["reason"] == "PromotionFailed" and "eval_loss 1.5000 is +50.0%" in promoted["message"]
    assert "maxEvalLossIncrease allows 0.1" in promoted["message"]
    assert status["phase"] == "Serving" and status["modelUri"] == run_1 and "reportUri" not in status
    assert condition(status, "RolledBack")["reason"] == "PromotionFailed"
    assert deployment(cluster, "chat-canary") is None  # gated before any canary started
    assert status["history"][-1]["run"] == 2 and status["history"][-1]["phase"] == "Failed"


def trained_spec(bucket: str, endpoint: str, secret: str, max_steps: int, expect: dict[str, str],
                 duration: int) -> dict[str, Any]:
    return {
        "model": {"create": {"size": "tiny", "seed": 0}, "family": "v2"},
        "data": {"sources": [f"s3://{bucket}/data/"], "maxLength": 64},
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modulesToSave": ["output_layer"]}},
        "training": {"maxSteps": max_steps, "learningRate": 2e-2, **MEMORISE},
        "output": {"uri": f"s3://{bucket}/models/chat", "export": "merged"},
        "s3": {"secretRef": {"name": secret}, "endpoint": endpoint},
        "serving": {"readyDeadlineSeconds": 300, "modelName": "chat", "promotion": {
            "goldenPrompts": [{"name": "greeting", "messages": [{"role": "user", "content": QUESTION}],
                               "expect": expect, "maxTokens": 24}],
            "canary": {"replicas": 1, "durationSeconds": duration, "maxErrorRate": 0.05}}},
    }


def test_canaried_promotion_restart_wrong_answer_and_server_errors(cluster, operator, harness, s3, new_bucket,
                                                                    moto_endpoint, s3_secret):
    pytest.importorskip("glmtune_trainer.run", reason="the trainer component is not installed")
    pytest.importorskip("glmtune_inference.server", reason="the inference component is not installed")
    bucket = new_bucket("canary")
    s3.put_object(Bucket=bucket, Key="data/one.jsonl", Body=json.dumps(
        {"id": 0, "paragraph": [{"q": QUESTION, "a": ANSWER}]}, ensure_ascii=False).encode() + b"\n")
    run_uri = f"s3://{bucket}/models/chat/run-{{}}".format
    op = operator()
    kube = harness(run_training=True, run_servers=True,
                   fault_after=lambda uri: 1 if uri == run_uri(3) else None)  # run 3's server fails after 1 answer
    status = lambda: (get_ft(cluster, "chat") or {}).get("status") or {}  # noqa: E731

    def diagnostics() -> str:
        run = status().get("run")
        return f"status: {status()}\njob:\n{kube.job_logs(f'chat-run-{run}')}\noperator:\n{op.tail(30)}"

    def observing(run: int) -> bool:
        if phase_of(cluster, "chat") in ("Serving", "Failed") and status().get("run") == run:
            pytest.fail(f"run {run} left the canary early\n{diagnostics()}")
        return status().get("run") == run and status().get("canaryStage") == "Observing"

    def stable_models() -> set[str]:
        return {uri for uri, _ in kube.served_models("chat-server")}

    # Run 1 answers the golden prompt; the operator is killed while its canary is watched and restarted.
    spec = trained_spec(bucket, moto_endpoint, s3_secret, 60, {"exact": ANSWER}, duration=20)
    cluster.call(lambda e: e.put(FT, finetune("chat", spec)))
    wait_for(lambda: observing(1), 600, "run 1's canary answering the golden prompt", diagnostics)
    since, canary_uid = status()["canaryObservedSince"], deployment(cluster, "chat-canary")["metadata"]["uid"]
    assert deployment(cluster, "chat-server") is None  # nothing served before: the canary has all the traffic
    op.stop(kill=True)
    op = operator()
    seen_uids = set()

    def promoted() -> bool:
        canary_deployment = deployment(cluster, "chat-canary")
        if canary_deployment is not None:
            seen_uids.add(canary_deployment["metadata"]["uid"])
        if status().get("phase") == "Canary":
            assert status()["canaryObservedSince"] == since  # the restarted operator resumed the same watch
        return status().get("phase") in ("Serving", "Failed")

    wait_for(promoted, 300, "run 1 promoted after the operator restart", diagnostics)
    assert status()["phase"] == "Serving" and status()["modelUri"] == run_uri(1), diagnostics()
    assert seen_uids <= {canary_uid}, "the canary Deployment was recreated"
    assert condition(status(), "Promoted")["reason"] == "CanaryPassed"
    wait_for(lambda: deployment(cluster, "chat-canary") is None, 30, "the canary removed")
    wait_for(lambda: len(events(cluster, "Promoted")) >= 1, 30, "the Promoted event")
    time.sleep(2)
    assert len(events(cluster, "Promoted")) == 1, "promoted twice"
    [endpoint] = kube.endpoints("chat-server")
    assert chat(endpoint, "chat")["choices"][0]["message"]["content"] == ANSWER

    # Run 2 barely moves the random model (Adam's first steps at 2e-2 can already memorise on a tiny model), so
    # it cannot answer: rolled back while run 1 serves throughout.
    patch_spec(cluster, "chat", {"training": {"maxSteps": 1, "learningRate": 1e-7}})
    wait_for(lambda: status().get("run") == 2 and phase_of(cluster, "chat") == "Serving", 600,
             "run 2 judged", lambda: (stable_models(), diagnostics())[1])
    assert stable_models() == {run_uri(1)}, diagnostics()
    promoted_condition = condition(status(), "Promoted")
    assert promoted_condition["reason"] == "PromotionFailed", diagnostics()
    assert "golden prompt 'greeting'" in promoted_condition["message"] and "answered" in promoted_condition["message"]
    assert status()["modelUri"] == run_uri(1) and condition(status(), "RolledBack")["reason"] == "PromotionFailed"
    wait_for(lambda: deployment(cluster, "chat-canary") is None, 30, "run 2's canary removed")
    [endpoint] = kube.endpoints("chat-server")
    assert chat(endpoint, "chat")["choices"][0]["message"]["content"] == ANSWER

    # Run 3's server fails every request after its golden prompt: rolled back long before the duration ends.
    patch_spec(cluster, "chat", {"training": {"maxSteps": 2}, "serving": {"promotion": {
        "goldenPrompts": [{"name": "any", "messages": [{"role": "user", "content": QUESTION}],
                           "expect": {"regex": "(?s).*"}}], "canary": {"durationSeconds": 300}}}})
    wait_for(lambda: observing(3), 600, "run 3's canary watched", diagnostics)
    started = time.monotonic()
    while phase_of(cluster, "chat") == "Canary" and time.monotonic() - started < 120:
        for url in kube.endpoints("chat-server"):  # clients of the Service reach the canary pod as well
            httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "chat", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4})
        time.sleep(0.2)
    assert phase_of(cluster, "chat") == "Serving" and time.monotonic() - started < 120, diagnostics()
    promoted_condition = condition(status(), "Promoted")
    assert promoted_condition["reason"] == "CanaryFailed" and "error rate" in promoted_condition["message"]
    assert status()["modelUri"] == run_uri(1) and stable_models() == {run_uri(1)}
    wait_for(lambda: deployment(cluster, "chat-canary") is None, 30, "run 3's canary removed")
    assert_chart_rbac_covers_operator(cluster)  # listing the canary pods included


def adapter_export(export_fp: str, base_fp: str | None) -> dict[str, bytes]:
    """A prefix export with its base bundled in `base/`, the base's cached fingerprint beside it."""
    info = {"format": 1, "kind": "prefix", "family": "v2", "template": "v2", "method": "ptv2", "base_model": "base",
            "base_fingerprint": export_fp, "pre_seq_len": 8}
    files = {"glmtune-export.json": json.dumps(info).encode(), "prefix_encoder.safetensors": b"\0" * 16,
             **{f"base/{name}": data for name, data in EXPORT.items()}}
    if base_fp is not None:
        files["base/glmtune-fingerprint.json"] = json.dumps({"format": 1, "fingerprint": base_fp, "files": {}}).encode()
    return files


def test_an_adapter_export_over_a_base_with_another_fingerprint_is_not_rolled_out(
        cluster, operator, harness, s3, new_bucket, moto_endpoint, s3_secret):
    pytest.importorskip("glmtune.fingerprint", reason="base fingerprints are not in this glmtune")
    bucket = new_bucket("base-fp")
    operator()
    kube = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    runs = [f"s3://{bucket}/models/chat/run-{n}" for n in (0, 1, 2, 3)]
    for run, files in ((1, EXPORT), (2, adapter_export("a" * 64, "b" * 64)), (3, adapter_export("c" * 64, "c" * 64))):
        if run > 1:
            patch_spec(cluster, "chat", {"training": {"maxSteps": 10 + run}})
        wait_for(lambda run=run: f"chat-run-{run}" in kube.jobs and phase_of(cluster, "chat") == "Training", 30,
                 f"run {run} training")
        upload_export(s3, runs[run], files)
        kube.finish_job(f"chat-run-{run}", "Succeeded")
        wait_for(lambda: phase_of(cluster, "chat") == "Serving" and get_ft(cluster, "chat")["status"]["history"][-1]
                 .get("finished"), 60, f"run {run} judged")
        status = get_ft(cluster, "chat")["status"]
        if run == 2:  # refused: the base it would load is not the one it was trained over
            exported = condition(status, "Exported")
            assert (exported["status"], exported["reason"]) == ("False", "BaseMismatch")
            assert "a" * 64 in exported["message"] and "b" * 64 in exported["message"]
            assert f"{runs[2]}/base/glmtune-fingerprint.json" in exported["message"]
            assert status["modelUri"] == runs[1] and condition(status, "RolledBack")["reason"] == "BaseMismatch"
            assert status["history"][-1]["phase"] == "Failed"
        else:
            assert status["modelUri"] == runs[run], status
