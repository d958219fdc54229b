"""Fixtures for the data-pipeline and storage tests: tiny tokenizers and a real-data subset (S3 fixtures: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


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
