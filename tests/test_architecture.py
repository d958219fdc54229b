"""Each layer imports only the layers below it, read from the source (AST) of every module of every package.

Layers: the core `glmtune` (spec, storage, templates, model code) names no component; the trainer and
inference never import each other; the operator uses only core modules that load without torch; the app
layer (`glmtune_app`: the command registry and `glmtune run`) may import everything. Imports inside functions
(lazy ones) count as edges too: they run on some path, and a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from testkit import REPO_ROOT

PACKAGES = {"glmtune": REPO_ROOT / "glmtune", "glmtune_trainer": REPO_ROOT / "trainer" / "glmtune_trainer",
            "glmtune_inference": REPO_ROOT / "inference" / "glmtune_inference",
            "glmtune_operator": REPO_ROOT / "operator" / "glmtune_operator",
            "glmtune_app": REPO_ROOT / "app" / "glmtune_app"}
# Which of our packages each package may import (itself always).
ALLOWED = {
    "glmtune": set(),
    "glmtune_trainer": {"glmtune"},
    "glmtune_inference": {"glmtune"},
    "glmtune_operator": {"glmtune"},
    "glmtune_app": {"glmtune", "glmtune_trainer", "glmtune_inference", "glmtune_operator"},
}
HEAVY = {"torch", "transformers", "deepspeed", "peft", "accelerate", "bitsandbytes", "safetensors"}


@dataclass(frozen=True)
class Import:
    """One import statement's target module, where it is, and whether it runs when the module is imported."""

    target: str
    line: int
    eager: bool


def _module_name(package: str, path: Path) -> str:
    parts = list(path.relative_to(PACKAGES[package]).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


@cache
def modules() -> dict[str, Path]:
    """Every module of every package: dotted name → file."""
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(package, path)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every module `module` imports, eager (module level, class bodies) or lazy (inside functions, or under
    `if TYPE_CHECKING`, which never runs)."""
    path = modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            lazy_here = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, child.lineno, eager) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", child)
                for alias in child.names:
                    # `from pkg import mod` imports pkg.mod when it is a module of ours.
                    sub = f"{target}.{alias.name}"
                    found.append(Import(sub if sub in modules() else target, child.lineno, eager))
            visit(child, eager and not lazy_here)

    visit(tree, True)
    return tuple(found)


def _package(name: str) -> str:
    return name.split(".")[0]


def _ours(name: str) -> bool:
    return _package(name) in PACKAGES


@cache
def eager_heavy(module: str, seen: frozenset[str] = frozenset()) -> str | None:
    """The chain by which importing `module` loads a heavy library at import time, or None."""
    for imp in imports_of(module):
        if not imp.eager:
            continue
        if _package(imp.target) in HEAVY:
            return f"{module}:{imp.line} -> {imp.target}"
        if imp.target in modules() and imp.target not in seen and imp.target != module:
            chain = eager_heavy(imp.target, seen | {module})
            if chain:
                return f"{module}:{imp.line} -> {chain}"
    # Importing a submodule runs its packages' __init__ first.
    parent = module.rsplit(".", 1)[0]
    if "." in module and parent in modules() and parent not in seen:
        return eager_heavy(parent, seen | {module})
    return None


def test_every_package_is_found_and_parsed() -> None:
    assert {_package(name) for name in modules()} == set(PACKAGES)
    assert len(modules()) > 60 and all(imports_of(name) is not None for name in modules())


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = [f"{modules()[name].relative_to(REPO_ROOT)}:{imp.line} imports {imp.target}"
             for name in modules() if _package(name) == package
             for imp in imports_of(name)
             if _ours(imp.target) and _package(imp.target) not in ALLOWED[package] | {package}]
    assert not wrong, "\n".join(wrong)


def test_the_operator_uses_only_core_modules_that_load_without_torch() -> None:
    wrong = []
    for name in modules():
        if _package(name) != "glmtune_operator":
            continue
        for imp in imports_of(name):
            target = imp.target
            chain = eager_heavy(target) if target in modules() else (target if _package(target) in HEAVY else None)
            if chain:
                wrong.append(f"{modules()[name].relative_to(REPO_ROOT)}:{imp.line} imports {target}: {chain}")
    assert not wrong, "\n".join(wrong)


def test_the_core_package_and_the_app_layer_load_without_torch() -> None:
    """`import glmtune` and the `glmtune` command's registry stay fast and small (the operator image)."""
    for name in ("glmtune", "glmtune.spec", "glmtune.storage", "glmtune.crd", "glmtune_app.cli",
                 "glmtune_app.pipeline", "glmtune_trainer.seam"):
        assert eager_heavy(name) is None, eager_heavy(name)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The rules above are only as good as the walker: a lazy import in a function is an edge."""
    lazy = [imp for imp in imports_of("glmtune_app.pipeline") if not imp.eager]
    assert any(imp.target.startswith("glmtune_trainer.") for imp in lazy)
    assert any(imp.target.startswith("glmtune_inference.") for imp in lazy)
    assert eager_heavy("glmtune_trainer.run") is not None  # torch at module level
