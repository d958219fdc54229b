"""Fixtures for the `glmtune run` tests: a small quickstart-like spec file and a moto S3 endpoint."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pipeline_testkit next to this file

from pipeline_testkit import small_spec  # noqa: E402


@pytest.fixture
def spec_file(tmp_path: Path) -> Callable[..., Path]:
    """`spec_file(**small_spec_args)` writes a small spec YAML into the test's folder and returns its path."""

    def write(**kwargs: Any) -> Path:
        path = tmp_path / "small.yaml"
        path.write_text(yaml.safe_dump(small_spec(**kwargs), allow_unicode=True, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket on the moto server, boto3's environment pointing at it, downloads cached in tmp_path."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "GLMTUNE_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    name = f"run-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
