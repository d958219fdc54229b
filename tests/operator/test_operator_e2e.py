"""End to end: GLMFineTune → PyTorchJob → real torchrun of the trainer → weights in moto S3 → Deployment
rolled → a real `glmtune serve` pod answers an OpenAI chat request. The harness runs the containers'
commands as local processes with the env Kubeflow and the kubelet would give them.
"""

from __future__ import annotations

import httpx
import pytest
from operator_testkit import FT, JOBS, NAMESPACE, finetune, get_ft, phase_of, wait_for
from testkit import REPO_ROOT

pytestmark = pytest.mark.slow

QUICKSTART = REPO_ROOT / "examples" / "data" / "quickstart.jsonl"


def test_finetune_resource_trains_exports_rolls_out_and_answers_chat(cluster, operator, harness, s3, new_bucket,
                                                                     moto_endpoint, s3_secret):
    pytest.importorskip("glmtune_trainer.run", reason="the trainer component is not installed")
    pytest.importorskip("glmtune_inference.server", reason="the inference component is not installed")
    bucket = new_bucket("e2e")
    s3.put_object(Bucket=bucket, Key="data/quickstart.jsonl", Body=QUICKSTART.read_bytes())
    spec = {
        "model": {"create": {"size": "tiny", "seed": 0}, "family": "v2"},
        "data": {"sources": [f"s3://{bucket}/data/"], "maxLength": 64},
        "method": {"name": "lora"},
        "training": {"maxSteps": 2, "batchSize": 2, "learningRate": 1e-2, "logEverySteps": 1,
                     "evaluation": {"everyEpoch": False}},
        "output": {"uri": f"s3://{bucket}/models/chat", "export": "merged"},
        "s3": {"secretRef": {"name": s3_secret}, "endpoint": moto_endpoint},
        "serving": {"readyDeadlineSeconds": 300, "modelName": "chat"},
    }
    op = operator()
    kube = harness(run_training=True, run_servers=True)
    cluster.call(lambda e: e.put(FT, finetune("chat", spec)))

    def diagnostics() -> str:
        return f"status: {(get_ft(cluster, 'chat') or {}).get('status')}\njob logs:\n{kube.job_logs('chat-run-1')}" \
               f"\noperator:\n{op.tail(30)}"

    wait_for(lambda: phase_of(cluster, "chat") in ("Deploying", "Serving", "Failed"), 400, "training and export",
             diagnostics)
    assert phase_of(cluster, "chat") != "Failed", diagnostics()
    objects = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="models/chat/run-1/")["Contents"]}
    assert "models/chat/run-1/glmtune-manifest.json" in objects and "models/chat/run-1/config.json" in objects

    wait_for(lambda: phase_of(cluster, "chat") in ("Serving", "Failed"), 300, "the rollout", diagnostics)
    status = get_ft(cluster, "chat")["status"]
    assert status["phase"] == "Serving" and status["modelUri"] == f"s3://{bucket}/models/chat/run-1"
    [endpoint] = kube.endpoints("chat-server")
    reply = httpx.post(f"{endpoint}/v1/chat/completions", timeout=120, json={
        "model": "chat", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["model"] == "chat" and isinstance(answer["choices"][0]["message"]["content"], str)
    assert [job["metadata"]["name"] for job in cluster.live(JOBS, NAMESPACE)] == ["chat-run-1"]
