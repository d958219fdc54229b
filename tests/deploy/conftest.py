"""Fixtures of the deployment tests: the helm binary that scripts/get_helm.sh installs, and chart rendering."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from testkit import REPO_ROOT

CHART = REPO_ROOT / "charts" / "glmtune"
RELEASE_NAMESPACE = "glmtune-system"

Render = Callable[..., list[dict[str, Any]]]


def helm_path() -> Path:
    """Where scripts/get_helm.sh puts helm (GLMTUNE_TOOLS_DIR overrides the folder, as in the script)."""
    return Path(os.environ.get("GLMTUNE_TOOLS_DIR", REPO_ROOT / ".venv" / "tools")) / "helm"


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for helm runs: its cache, config and data folders in a temp dir, never the user's."""
    home = tmp_path_factory.mktemp("helm-home")
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    """The helm executable; skips the test when scripts/get_helm.sh has not run."""
    binary = helm_path()
    if not os.access(binary, os.X_OK):
        pytest.skip(f"helm is absent at {binary}: run scripts/get_helm.sh")
    return binary


@pytest.fixture(scope="session")
def helm(helm_binary: Path, helm_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `helm ARGS...` (captured output, no check)."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(helm_binary), *args], capture_output=True, text=True, env=helm_env, timeout=60, check=False
        )

    return run


@pytest.fixture(scope="session")
def render(helm: Callable[..., subprocess.CompletedProcess[str]]) -> Render:
    """`render(values_files=(), sets=())`: the objects `helm template` renders for release glmtune."""

    def run(values_files: Sequence[Path] = (), sets: Sequence[str] = ()) -> list[dict[str, Any]]:
        args = ["template", "glmtune", str(CHART), "--namespace", RELEASE_NAMESPACE]
        for path in values_files:
            args += ["--values", str(path)]
        for item in sets:
            args += ["--set", item]
        result = helm(*args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return run
