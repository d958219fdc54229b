"""Fixtures for the trainer tests: tiny model directories (made once), spec factories, a moto S3 endpoint."""

from __future__ import annotations

import copy
import os
import socket
from collections.abc import Callable
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
def extensions_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where DeepSpeed compiles its CPU ops, once per session: $TORCH_EXTENSIONS_DIR when CI sets one, else a
    session folder (the same one tests/app uses), never ~/.cache."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or tmp_path_factory.getbasetemp() / "torch-extensions")
