"""End to end: GLMFineTune → PyTorchJob → real torchrun of the trainer → weights in moto S3 → Deployment
rolled → a real `glmtune serve` pod answers an OpenAI chat request with the answer it was trained on. The
harness runs the containers' commands as local processes with the env Kubeflow and the kubelet would give them.

Both runs train a created tiny model on one memorisable question long enough to answer it exactly: a merged
LoRA export, and a p-tuning v2 export over an int4 base, whose created base travels inside the export
(`base/`) because the inference pod cannot reach the trainer's disk.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from operator_testkit import FT, JOBS, NAMESPACE, finetune, get_ft, phase_of, wait_for

pytestmark = pytest.mark.slow

QUESTION, ANSWER = "你好", "我是小助手。"
MEMORISE = {"batchSize": 1, "scheduler": "constant", "maxGradNorm": 0.0, "logEverySteps": 10,
            "evaluation": {"everyEpoch": False}}


def train_and_serve(cluster, operator, harness, s3, bucket: str, name: str, spec: dict[str, Any]) -> str:
    """Apply the resource, wait through training, export and rollout; the Ready server pod's base URL."""
    s3.put_object(Bucket=bucket, Key="data/one.jsonl", Body=json.dumps(
        {"id": 0, "paragraph": [{"q": QUESTION, "a": ANSWER}]}, ensure_ascii=False).encode() + b"\n")
    op = operator()
    kube = harness(run_training=True, run_servers=True)
    cluster.call(lambda e: e.put(FT, finetune(name, spec)))

    def diagnostics() -> str:
        return f"status: {(get_ft(cluster, name) or {}).get('status')}\njob logs:\n{kube.job_logs(f'{name}-run-1')}" \
               f"\noperator:\n{op.tail(30)}"

    wait_for(lambda: phase_of(cluster, name) in ("Serving", "Failed"), 600, "training, export and rollout",
             diagnostics)
    status = get_ft(cluster, name)["status"]
    assert status["phase"] == "Serving", diagnostics()
    assert status["modelUri"] == f"s3://{bucket}/models/{name}/run-1"
    assert [job["metadata"]["name"] for job in cluster.live(JOBS, NAMESPACE)] == [f"{name}-run-1"]
    [endpoint] = kube.endpoints(f"{name}-server")
    return endpoint


def chat(endpoint: str, model: str) -> dict[str, Any]:
    reply = httpx.post(f"{endpoint}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def exported(s3: Any, bucket: str, name: str) -> tuple[set[str], dict[str, Any]]:
    prefix = f"models/{name}/run-1/"
    keys = {o["Key"].removeprefix(prefix) for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    info = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}glmtune-export.json")["Body"].read())
    return keys, info


def test_finetune_resource_trains_exports_rolls_out_and_answers_chat(cluster, operator, harness, s3, new_bucket,
                                                                     moto_endpoint, s3_secret):
    pytest.importorskip("glmtune_trainer.run", reason="the trainer component is not installed")
    pytest.importorskip("glmtune_inference.server", reason="the inference component is not installed")
    bucket = new_bucket("e2e")
    spec = {
        "model": {"create": {"size": "tiny", "seed": 0}, "family": "v2"},
        "data": {"sources": [f"s3://{bucket}/data/"], "maxLength": 64},
        # LoRA alone cannot memorise text into a tiny random model; the output layer trains along.
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modulesToSave": ["output_layer"]}},
        "training": {"maxSteps": 60, "learningRate": 2e-2, **MEMORISE},
        "output": {"uri": f"s3://{bucket}/models/chat", "export": "merged"},
        "s3": {"secretRef": {"name": s3_secret}, "endpoint": moto_endpoint},
        "serving": {"readyDeadlineSeconds": 300, "modelName": "chat"},
    }
    endpoint = train_and_serve(cluster, operator, harness, s3, bucket, "chat", spec)
    keys, info = exported(s3, bucket, "chat")
    assert {"glmtune-manifest.json", "config.json"} <= keys and info["kind"] == "merged"
    answer = chat(endpoint, "chat")
    assert answer["model"] == "chat" and answer["choices"][0]["message"]["content"] == ANSWER


def test_a_prefix_export_of_a_created_int4_model_is_served_from_s3_with_its_base(cluster, operator, harness, s3,
                                                                                 new_bucket, moto_endpoint,
                                                                                 s3_secret):
    pytest.importorskip("glmtune_trainer.run", reason="the trainer component is not installed")
    pytest.importorskip("glmtune_inference.server", reason="the inference component is not installed")
    bucket = new_bucket("e2e-ptv2")
    spec = {
        "model": {"create": {"size": "tiny", "seed": 0}, "family": "v2", "quantization": {"bits": 4}},
        "data": {"sources": [f"s3://{bucket}/data/"], "maxLength": 64},
        "method": {"name": "ptv2", "ptv2": {"preSeqLen": 8}},
        "training": {"maxSteps": 150, "learningRate": 5e-2, **MEMORISE},
        "output": {"uri": f"s3://{bucket}/models/ptv2", "export": "adapter"},
        "s3": {"secretRef": {"name": s3_secret}, "endpoint": moto_endpoint},
        "serving": {"readyDeadlineSeconds": 300, "modelName": "ptv2"},
    }
    endpoint = train_and_serve(cluster, operator, harness, s3, bucket, "ptv2", spec)
    keys, info = exported(s3, bucket, "ptv2")
    assert (info["kind"], info["base_model"], info["quantization_bit"]) == ("prefix", "base", 4)
    assert {"prefix_encoder.safetensors", "base/config.json", "base/model.safetensors"} <= keys
    assert chat(endpoint, "ptv2")["choices"][0]["message"]["content"] == ANSWER
