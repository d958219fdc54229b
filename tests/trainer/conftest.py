"""Fixtures for the trainer tests: tiny model directories (made once), spec factories, a moto S3 endpoint."""

from __future__ import annotations

import copy
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from testkit import REPO_ROOT

QUICKSTART = REPO_ROOT / "examples" / "data" / "quickstart.jsonl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model("v1" | "v2")`: a random tiny model + tokenizer directory, created once per session."""
    import torch

    torch.set_num_threads(1)
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            from glmtune.modeling import create_model_dir

            made[family] = create_model_dir(family, "tiny", tmp_path_factory.mktemp(f"tiny-{family}") / "m", seed=0)
        return made[family]

    return get


def spec_mapping(model_dir: Path, out: Path, method: str = "lora", **training: Any) -> dict[str, Any]:
    """A small GLMFineTune mapping over the quickstart data; `training` keys are camelCase overrides."""
    base_training = {"epochs": 2, "batchSize": 2, "learningRate": 1e-2, "logEverySteps": 1,
                     "evaluation": {"everyEpoch": False}}
    base_training.update(training)
    return {"metadata": {"name": "t"}, "spec": {
        "model": {"uri": str(model_dir)},
        "data": {"sources": [str(QUICKSTART)], "maxLength": 64},
        "method": {"name": method},
        "training": base_training,
        "output": {"uri": str(out)},
    }}


@pytest.fixture
def make_spec(tiny_model: Callable[[str], Path], tmp_path: Path) -> Callable[..., Any]:
    """`make_spec(method="lora", family="v2", method_settings=None, data=None, **training)` → GLMFineTune."""
    from glmtune.spec import spec_from_mapping

    def make(method: str = "lora", family: str = "v2", method_settings: dict | None = None,
             data: dict | None = None, output: dict | None = None, **training: Any) -> Any:
        mapping = spec_mapping(tiny_model(family), tmp_path / "export", method, **training)
        if method_settings is not None:
            mapping["spec"]["method"][method] = method_settings
        mapping["spec"]["data"].update(data or {})
        mapping["spec"]["output"].update(output or {})
        return spec_from_mapping(copy.deepcopy(mapping), "test")

    return make


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server with boto3's environment pointing at it; returns its name."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name
