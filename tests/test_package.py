"""The package's promises about imports and layout."""

from __future__ import annotations

import subprocess
import sys

from testkit import REPO_ROOT


def test_import_glmtune_and_operator_pull_in_no_torch() -> None:
    code = (
        "import sys, glmtune, glmtune_app.cli, glmtune.errors\n"
        "try:\n    import glmtune_operator\nexcept ModuleNotFoundError:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_the_operator_process_imports_no_torch() -> None:
    """Everything the operator process loads (kopf handlers, its CLI, every module of the package, the CRD
    and spec code) stays free of torch, transformers and deepspeed, so its image can leave them out."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import glmtune_operator, glmtune_operator.handlers, glmtune_operator.cli, glmtune.crd, glmtune.spec_docs\n"
        "modules = [m.name for m in pkgutil.walk_packages(glmtune_operator.__path__, 'glmtune_operator.')]\n"
        "for name in modules:\n    importlib.import_module(name)\n"
        "assert 'glmtune_operator.handlers' in modules and len(modules) > 5, modules\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_stdlib_operator_is_not_shadowed_from_repo_root() -> None:
    code = "import collections, operator; assert hasattr(operator, 'itemgetter'), operator.__file__"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_cli_help_lists_only_real_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "glmtune_app.cli", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "usage: glmtune" in out
