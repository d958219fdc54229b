"""The operator for real (kopf subprocess) against the API emulator and moto S3, with the harness as Kubeflow.

Here the harness does not run trainer pods: it writes the PyTorchJob conditions the training operator
would, the test puts the export into S3 where the trainer would, and the kubelet stand-in reports pod
readiness per model URI. That isolates the operator's state machine: phases, idempotency, rollback.
Each test starts its own API server and operator; the two quickest run by default, the rest are `slow`.
"""

from __future__ import annotations

from typing import Any

import pytest
from operator_testkit import (
    FT,
    JOBS,
    NAMESPACE,
    assert_chart_rbac_covers_operator,
    finetune,
    get_ft,
    patch_spec,
    phase_of,
    upload_export,
    wait_for,
)

EXPORT = {"config.json": b'{"model_type": "chatglm"}', "model.safetensors": b"\0" * 64}


def make_spec(bucket: str, endpoint: str, **sections: Any) -> dict[str, Any]:
    spec = {"model": {"create": {"size": "tiny"}, "family": "v2"},
            "data": {"sources": [f"s3://{bucket}/data/"]},
            "output": {"uri": f"s3://{bucket}/models/chat"},
            "s3": {"secretRef": {"name": "s3-creds"}, "endpoint": endpoint},
            "serving": {"readyDeadlineSeconds": 10}}
    spec.update(sections)
    return spec


def jobs(cluster) -> list[str]:
    return sorted(job["metadata"]["name"] for job in cluster.live(JOBS, NAMESPACE))


def deployment(cluster, name: str) -> dict[str, Any] | None:
    return next((d for d in cluster.live("apps/v1/deployments", NAMESPACE) if d["metadata"]["name"] == name), None)


def model_uri_of(deploy: dict[str, Any] | None) -> str | None:
    if deploy is None:
        return None
    env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    return next(e["value"] for e in env if e["name"] == "GLMTUNE_MODEL_URI")


def train_run(cluster, harness, s3, bucket: str, name: str, run: int) -> str:
    """Wait for run `run`'s job, put its export into S3, report success; returns the export URI."""
    job = f"{name}-run-{run}"
    wait_for(lambda: job in harness.jobs and phase_of(cluster, name) == "Training", 30, f"{job} training")
    uri = f"s3://{bucket}/models/chat/run-{run}"
    upload_export(s3, uri, EXPORT)
    harness.finish_job(job, "Succeeded")
    return uri


def test_apply_creates_one_job_with_adopted_children(cluster, operator, harness, new_bucket, moto_endpoint,
                                                     s3_secret):
    bucket = new_bucket("data")
    operator()
    harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint), labels={"team": "nlp"})))
    wait_for(lambda: phase_of(cluster, "chat") == "Training", 30, "phase Training")
    owner_uid = get_ft(cluster, "chat")["metadata"]["uid"]
    job = cluster.live(JOBS, NAMESPACE)[0]
    assert jobs(cluster) == ["chat-run-1"]
    assert job["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    assert job["metadata"]["labels"]["glmtune.io/run"] == "1" and job["metadata"]["labels"]["team"] == "nlp"
    config_maps = {c["metadata"]["name"]: c for c in cluster.live("v1/configmaps", NAMESPACE)}
    assert "s3://" in config_maps["chat-run-1-spec"]["data"]["spec.yaml"]
    assert config_maps["chat-run-1-spec"]["metadata"]["ownerReferences"][0]["uid"] == owner_uid
    service = cluster.live("v1/services", NAMESPACE)[0]
    assert service["metadata"]["name"] == "chat-server"
    status = get_ft(cluster, "chat")["status"]
    assert status["run"] == 1 and status["jobName"] == "chat-run-1" and status["observedGeneration"] == 1
    assert cluster.call(lambda e: e.api_calls["create", "pytorchjobs"]) == 1


@pytest.mark.slow
def test_successful_run_is_rolled_out_and_served(cluster, operator, harness, s3, new_bucket, moto_endpoint,
                                                 s3_secret):
    bucket = new_bucket("data")
    op = operator()
    kubelet = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    uri = train_run(cluster, kubelet, s3, bucket, "chat", 1)
    wait_for(lambda: phase_of(cluster, "chat") == "Serving", 30, "phase Serving", op.tail)
    status = get_ft(cluster, "chat")["status"]
    assert status["modelUri"] == uri and len(status["modelManifestSha256"]) == 64
    assert model_uri_of(deployment(cluster, "chat-server")) == uri
    assert kubelet.served_models("chat-server") == [(uri, True)]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions.items() >= {"Trained": "True", "Exported": "True", "Ready": "True"}.items()
    assert status["history"][-1] | {"run": 1, "phase": "Serving", "modelUri": uri} == status["history"][-1]
    reasons = [event["reason"] for event in cluster.live("v1/events", NAMESPACE)]
    assert {"RunStarted", "Training", "Exporting", "Deploying", "Serving"} <= set(reasons)
    assert op.metric("glmtune_runs_total", namespace=NAMESPACE, outcome="succeeded") == 1
    assert op.metric("glmtune_reconcile_duration_seconds_count", handler="create") == 1


@pytest.mark.slow
def test_failed_rollout_rolls_back_and_the_old_model_keeps_serving(cluster, operator, harness, s3, new_bucket,
                                                                   moto_endpoint, s3_secret):
    bucket = new_bucket("data")
    op = operator()
    kubelet = harness(run_training=False, run_servers=False, ready_when=lambda uri: not uri.endswith("run-2"))
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    good = train_run(cluster, kubelet, s3, bucket, "chat", 1)
    wait_for(lambda: phase_of(cluster, "chat") == "Serving", 30, "run 1 serving", op.tail)

    patch_spec(cluster, "chat", {"training": {"learningRate": 1e-4}})  # run 2, whose model never gets Ready
    train_run(cluster, kubelet, s3, bucket, "chat", 2)
    wait_for(lambda: phase_of(cluster, "chat") == "Deploying", 30, "run 2 deploying", op.tail)
    seen_during_rollout = []
    wait_for(lambda: seen_during_rollout.append(kubelet.served_models("chat-server"))
             or (get_ft(cluster, "chat")["status"].get("candidateUri") is None), 40, "the rollback", op.tail)

    status = get_ft(cluster, "chat")["status"]
    rolled_back = next(c for c in status["conditions"] if c["type"] == "RolledBack")
    assert status["phase"] == "Serving" and status["modelUri"] == good
    assert rolled_back["status"] == "True" and rolled_back["reason"] == "ReadyDeadlineExceeded"
    assert "run-2" in rolled_back["message"] and good in rolled_back["message"]
    assert status["history"][-1]["run"] == 2 and status["history"][-1]["phase"] == "Failed"
    wait_for(lambda: model_uri_of(deployment(cluster, "chat-server")) == good, 10, "the Deployment back on run 1")
    # Throughout the rollout a Ready pod served run 1's model.
    assert all((good, True) in models for models in seen_during_rollout)
    assert op.metric("glmtune_runs_total", namespace=NAMESPACE, outcome="failed") == 1
    assert_chart_rbac_covers_operator(cluster)


@pytest.mark.slow
def test_operator_restart_mid_run_creates_no_duplicate_job(cluster, operator, harness, s3, new_bucket,
                                                           moto_endpoint, s3_secret):
    bucket = new_bucket("data")
    first = operator()
    kubelet = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    wait_for(lambda: phase_of(cluster, "chat") == "Training", 30, "run 1 training", first.tail)
    first.stop(kill=True)  # SIGKILL mid-run: no chance to clean up

    second = operator()
    train_run(cluster, kubelet, s3, bucket, "chat", 1)
    wait_for(lambda: phase_of(cluster, "chat") == "Serving", 30, "run 1 serving after the restart", second.tail)
    assert jobs(cluster) == ["chat-run-1"] and kubelet.job_log == ["chat-run-1"]
    assert get_ft(cluster, "chat")["status"]["run"] == 1
    versions = cluster.call(lambda e: list(e.objects[JOBS, NAMESPACE, "chat-run-1"].history))
    assert None not in versions  # the job was never deleted and created again


@pytest.mark.slow
def test_children_left_by_an_interrupted_create_are_adopted_not_duplicated(cluster, operator, harness, new_bucket,
                                                                            moto_endpoint, s3_secret):
    from glmtune_operator import builders
    from glmtune_operator.settings import OperatorSettings

    from glmtune.spec import spec_from_mapping

    bucket = new_bucket("data")
    created = cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    # What an operator that died right after creating the job (before recording it) leaves behind.
    ft, settings = spec_from_mapping(created), OperatorSettings(trainer_image="glmtune-train:test")
    cluster.call(lambda e: e.put("v1/configmaps", builders.build_config_map(ft, created, 1)))
    cluster.call(lambda e: e.put(JOBS, builders.build_pytorchjob(ft, created, 1, settings)))
    harness(run_training=False, run_servers=False)
    op = operator()
    wait_for(lambda: phase_of(cluster, "chat") == "Training", 30, "run 1 adopted and training", op.tail)
    assert jobs(cluster) == ["chat-run-1"]
    assert get_ft(cluster, "chat")["status"]["jobName"] == "chat-run-1"


@pytest.mark.slow
def test_serving_change_patches_the_deployment_without_a_new_run(cluster, operator, harness, s3, new_bucket,
                                                                 moto_endpoint, s3_secret):
    bucket = new_bucket("data")
    op = operator()
    kubelet = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    uri = train_run(cluster, kubelet, s3, bucket, "chat", 1)
    wait_for(lambda: phase_of(cluster, "chat") == "Serving", 30, "run 1 serving", op.tail)

    patch_spec(cluster, "chat", {"serving": {"replicas": 2, "maxBatchSize": 4}})
    wait_for(lambda: (deployment(cluster, "chat-server") or {}).get("spec", {}).get("replicas") == 2, 20,
             "the Deployment scaled to 2", op.tail)
    wait_for(lambda: kubelet.served_models("chat-server") == [(uri, True), (uri, True)], 20, "two ready pods")
    status = get_ft(cluster, "chat")["status"]
    assert jobs(cluster) == ["chat-run-1"] and status["run"] == 1 and status["phase"] == "Serving"
    assert status["observedGeneration"] == get_ft(cluster, "chat")["metadata"]["generation"]
    command = deployment(cluster, "chat-server")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--max-batch") + 1] == "4"


@pytest.mark.slow
def test_training_change_starts_a_new_run_with_its_own_job(cluster, operator, harness, s3, new_bucket,
                                                           moto_endpoint, s3_secret):
    bucket = new_bucket("data")
    op = operator()
    kubelet = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    train_run(cluster, kubelet, s3, bucket, "chat", 1)
    wait_for(lambda: phase_of(cluster, "chat") == "Serving", 30, "run 1 serving", op.tail)
    patch_spec(cluster, "chat", {"training": {"epochs": 2}})
    uri = train_run(cluster, kubelet, s3, bucket, "chat", 2)
    wait_for(lambda: phase_of(cluster, "chat") == "Serving" and get_ft(cluster, "chat")["status"]["modelUri"] == uri,
             30, "run 2 serving", op.tail)
    assert jobs(cluster) == ["chat-run-1", "chat-run-2"]
    spec_yaml = next(c for c in cluster.live("v1/configmaps", NAMESPACE)
                     if c["metadata"]["name"] == "chat-run-2-spec")["data"]["spec.yaml"]
    assert "epochs: 2" in spec_yaml and f"s3://{bucket}/models/chat/run-2" in spec_yaml
    assert model_uri_of(deployment(cluster, "chat-server")) == uri


@pytest.mark.slow
def test_dropped_data_file_starts_exactly_one_new_run_after_the_current_one(cluster, operator, harness, s3,
                                                                            new_bucket, moto_endpoint, s3_secret):
    bucket = new_bucket("data")
    s3.put_object(Bucket=bucket, Key="data/part-1.jsonl", Body=b'{"instruction": "hi", "output": "hello"}\n')
    op = operator()
    kubelet = harness(run_training=False, run_servers=False)
    spec = make_spec(bucket, moto_endpoint, data={"sources": [f"s3://{bucket}/data/"], "watch": True,
                                                  "watchIntervalSeconds": 5})
    cluster.call(lambda e: e.put(FT, finetune("chat", spec)))
    wait_for(lambda: phase_of(cluster, "chat") == "Training", 30, "run 1 training", op.tail)
    recorded = get_ft(cluster, "chat")["status"]["dataVersions"]
    assert list(recorded) == [f"s3://{bucket}/data/part-1.jsonl"]

    s3.put_object(Bucket=bucket, Key="data/part-2.jsonl", Body=b'{"instruction": "bye", "output": "ciao"}\n')
    s3.put_object(Bucket=bucket, Key="data/notes.txt", Body=b"not data")
    train_run(cluster, kubelet, s3, bucket, "chat", 1)  # the drop waits for run 1 to finish
    wait_for(lambda: "chat-run-2" in jobs(cluster), 30, "run 2 started by the drop", op.tail)
    status = get_ft(cluster, "chat")["status"]
    assert sorted(status["dataVersions"]) == [f"s3://{bucket}/data/part-1.jsonl", f"s3://{bucket}/data/part-2.jsonl"]
    started = [e["message"] for e in cluster.live("v1/events", NAMESPACE) if e["reason"] == "RunStarted"]
    assert any("part-2.jsonl" in message for message in started)
    train_run(cluster, kubelet, s3, bucket, "chat", 2)
    wait_for(lambda: get_ft(cluster, "chat")["status"].get("modelUri", "").endswith("run-2"), 30, "run 2 serving")
    wait_for(lambda: op.metric("glmtune_runs_total", namespace=NAMESPACE, outcome="succeeded") == 2, 10, "metrics")
    import time

    time.sleep(6)  # more than one watch interval with unchanged data
    assert jobs(cluster) == ["chat-run-1", "chat-run-2"]


def test_invalid_spec_ends_failed_with_the_field_named(cluster, operator, harness, new_bucket, moto_endpoint,
                                                        s3_secret):
    bucket = new_bucket("data")
    op = operator()
    spec = make_spec(bucket, moto_endpoint, data={"sources": ["ftp://example.org/data.json"]})
    cluster.call(lambda e: e.put(FT, finetune("chat", spec)))
    wait_for(lambda: phase_of(cluster, "chat") == "Failed", 90, "phase Failed", op.tail)
    status = get_ft(cluster, "chat")["status"]
    valid = next(c for c in status["conditions"] if c["type"] == "SpecValid")
    assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
    assert valid["message"].startswith("spec.data.sources[0]:") and "ftp" in valid["message"]
    assert jobs(cluster) == []
    warnings = [e for e in cluster.live("v1/events", NAMESPACE) if e["reason"] == "InvalidSpec"]
    assert warnings and warnings[0]["type"] == "Warning"

    patch_spec(cluster, "chat", {"data": {"sources": [f"s3://{bucket}/data/"]}})  # fixed: the run starts
    wait_for(lambda: jobs(cluster) == ["chat-run-1"], 30, "run 1 after the fix", op.tail)


@pytest.mark.slow
def test_job_failure_fails_the_run_and_is_counted(cluster, operator, harness, new_bucket, moto_endpoint, s3_secret):
    bucket = new_bucket("data")
    op = operator()
    kubelet = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    wait_for(lambda: phase_of(cluster, "chat") == "Training", 30, "run 1 training", op.tail)
    kubelet.finish_job("chat-run-1", "Failed", "master exited with code 137 (OOMKilled)")
    wait_for(lambda: phase_of(cluster, "chat") == "Failed", 30, "phase Failed", op.tail)
    trained = next(c for c in get_ft(cluster, "chat")["status"]["conditions"] if c["type"] == "Trained")
    assert trained["status"] == "False" and "OOMKilled" in trained["message"]
    assert op.metric("glmtune_runs_total", namespace=NAMESPACE, outcome="failed") == 1
    assert op.metric("glmtune_runs_total", namespace=NAMESPACE, outcome="started") == 1
    assert deployment(cluster, "chat-server") is None


@pytest.mark.slow
def test_incomplete_export_is_never_rolled_out(cluster, operator, harness, s3, new_bucket, moto_endpoint,
                                               s3_secret):
    bucket = new_bucket("data")
    op = operator(GLMTUNE_EXPORT_GRACE_SECONDS="3")
    kubelet = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    wait_for(lambda: phase_of(cluster, "chat") == "Training", 30, "run 1 training", op.tail)
    s3.put_object(Bucket=bucket, Key="models/chat/run-1/config.json", Body=b"{}")  # no manifest: unfinished
    kubelet.finish_job("chat-run-1", "Succeeded")
    wait_for(lambda: phase_of(cluster, "chat") == "Failed", 30, "phase Failed after the grace period", op.tail)
    exported = next(c for c in get_ft(cluster, "chat")["status"]["conditions"] if c["type"] == "Exported")
    assert exported["reason"] == "ExportIncomplete" and "glmtune-manifest.json" in exported["message"]
    assert deployment(cluster, "chat-server") is None


@pytest.mark.slow
def test_deleting_the_resource_removes_children_but_never_s3_objects(cluster, operator, harness, s3, new_bucket,
                                                                     moto_endpoint, s3_secret):
    from operator_testkit import api_request

    bucket = new_bucket("data")
    s3.put_object(Bucket=bucket, Key="data/part-1.jsonl", Body=b"{}\n")
    op = operator()
    kubelet = harness(run_training=False, run_servers=False)
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    train_run(cluster, kubelet, s3, bucket, "chat", 1)
    wait_for(lambda: phase_of(cluster, "chat") == "Serving", 30, "run 1 serving", op.tail)
    before = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])

    api_request(cluster, "DELETE", f"/apis/glmtune.io/v1alpha1/namespaces/{NAMESPACE}/glmfinetunes/chat")
    kinds = ("kubeflow.org/v1/pytorchjobs", "v1/configmaps", "v1/services", "apps/v1/deployments")
    wait_for(lambda: not any(cluster.live(kind, NAMESPACE) for kind in kinds), 20, "children garbage-collected")
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]) == before
    assert "models/chat/run-1/glmtune-manifest.json" in before and "data/part-1.jsonl" in before
    assert_chart_rbac_covers_operator(cluster)


@pytest.mark.slow
def test_suspended_resource_gets_a_suspended_job_and_resumes(cluster, operator, harness, new_bucket, moto_endpoint,
                                                             s3_secret):
    bucket = new_bucket("data")
    op = operator()
    harness(run_training=False, run_servers=False)
    spec = make_spec(bucket, moto_endpoint, runPolicy={"suspend": True})
    cluster.call(lambda e: e.put(FT, finetune("chat", spec)))
    wait_for(lambda: phase_of(cluster, "chat") == "Suspended" and jobs(cluster), 30, "phase Suspended", op.tail)
    assert cluster.live(JOBS, NAMESPACE)[0]["spec"]["runPolicy"]["suspend"] is True
    patch_spec(cluster, "chat", {"runPolicy": {"suspend": False}})
    wait_for(lambda: phase_of(cluster, "chat") == "Training", 30, "phase Training after resuming", op.tail)
    assert cluster.live(JOBS, NAMESPACE)[0]["spec"]["runPolicy"]["suspend"] is False
    assert jobs(cluster) == ["chat-run-1"]


@pytest.mark.slow
def test_missing_s3_secret_keeps_the_run_pending_until_it_exists(cluster, operator, harness, new_bucket,
                                                                 moto_endpoint):
    import base64

    bucket = new_bucket("data")
    op = operator()
    cluster.call(lambda e: e.put(FT, finetune("chat", make_spec(bucket, moto_endpoint))))
    wait_for(lambda: phase_of(cluster, "chat") == "Pending", 30, "phase Pending", op.tail)
    condition = next(c for c in get_ft(cluster, "chat")["status"]["conditions"] if c["type"] == "S3Credentials")
    assert condition["reason"] == "SecretMissing" and "s3-creds" in condition["message"]
    assert jobs(cluster) == []
    data = {key: base64.b64encode(b"testing").decode() for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cluster.call(lambda e: e.put("v1/secrets", {"metadata": {"name": "s3-creds", "namespace": NAMESPACE},
                                                "data": data}))
    wait_for(lambda: jobs(cluster) == ["chat-run-1"], 30, "run 1 once the Secret exists", op.tail)
