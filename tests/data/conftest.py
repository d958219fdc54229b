"""Fixtures for the data-pipeline and storage tests: a real S3 endpoint (moto) on 127.0.0.1 and tiny tokenizers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto S3 server for the session, on a free port of 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket on the moto server, with the environment pointing boto3 at it; returns its name."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "glmtune-cache"))
    from glmtune.storage import s3_client

    name = f"bucket-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SentencePiece tokenizers of every family, trained once per session (Chinese + English text)."""
    from glmtune.tokenization.tiny import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-tokenizers")
    return {family: train_tiny_tokenizer(family, root / family) for family in ("v1", "v2", "v3")}


@pytest.fixture(scope="session")
def tiny_tokenizers(tiny_tokenizer_dirs: dict[str, Path]) -> dict:
    from glmtune.tokenization import load_tokenizer

    return {family: load_tokenizer(path) for family, path in tiny_tokenizer_dirs.items()}


@pytest.fixture(scope="session")
def alpaca_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 160 records of the real alpaca_zh file (as a JSON array, like the original)."""
    import json

    from testkit import require_shared

    records = json.loads(require_shared("data", "alpaca_zh_0-3252.json").read_text(encoding="utf-8"))[:160]
    path = tmp_path_factory.mktemp("alpaca") / "alpaca_zh_head.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
