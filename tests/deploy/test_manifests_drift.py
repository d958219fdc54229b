"""manifests/ is the chart rendered for `kubectl apply`: equal to a fresh render, and valid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from testkit import REPO_ROOT

RENDERED = ["manifests/crd.yaml", "manifests/operator.yaml", "charts/glmtune/crds/glmfinetunes.yaml"]


@pytest.fixture(scope="module")
def fresh_render(
    helm_binary: Path, helm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """scripts/render_manifests.sh run into a temp folder (the repository stays untouched)."""
    dest = tmp_path_factory.mktemp("render")
    env = {**helm_env, "PYTHON": sys.executable, "GLMTUNE_TOOLS_DIR": str(helm_binary.parent)}
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/render_manifests.sh"), str(dest)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dest


@pytest.mark.parametrize("relative", RENDERED)
def test_committed_manifests_equal_a_fresh_render_of_the_chart(fresh_render: Path, relative: str) -> None:
    committed = (REPO_ROOT / relative).read_text(encoding="utf-8")
    assert committed == (fresh_render / relative).read_text(encoding="utf-8"), (
        f"{relative} drifted from charts/glmtune: run scripts/render_manifests.sh"
    )


def test_plain_manifests_hold_namespace_rbac_and_operator_deployment() -> None:
    objects = [doc for doc in yaml.safe_load_all((REPO_ROOT / "manifests/operator.yaml").read_text()) if doc]
    kinds = [obj["kind"] for obj in objects]
    assert kinds[0] == "Namespace", "the namespace must be created before the objects in it"
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= set(kinds)
    namespace = objects[0]["metadata"]["name"]
    assert all(obj["metadata"].get("namespace", namespace) == namespace for obj in objects)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_manifests_folder_applies_the_crd_before_the_operator() -> None:
    # `kubectl apply -f manifests/` takes files in name order and does not descend into examples/.
    top_level = sorted(path.name for path in (REPO_ROOT / "manifests").glob("*.yaml"))
    assert top_level == ["crd.yaml", "operator.yaml"]
    assert os.path.isdir(REPO_ROOT / "manifests/examples")
