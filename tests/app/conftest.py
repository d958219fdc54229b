"""Fixtures for the `glmtune run` tests: a small quickstart-like spec file (S3 fixtures: tests/conftest.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
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
