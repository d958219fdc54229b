"""Helpers of the `glmtune run` tests (import as `pipeline_testkit`): the small spec, free ports, the README."""

from __future__ import annotations

import re
import socket
from typing import Any

from testkit import REPO_ROOT

QUICKSTART_DATA = REPO_ROOT / "examples" / "data" / "quickstart.jsonl"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def small_spec(steps: int = 3, output: str = "export", sources: list[str] | None = None) -> dict[str, Any]:
    """The quickstart spec shrunk to `steps` optimizer steps: a tiny random v2 model, full fine-tuning."""
    return {
        "apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "metadata": {"name": "small"},
        "spec": {
            "model": {"family": "v2", "create": {"size": "tiny", "seed": 0}},
            "data": {"sources": sources or [str(QUICKSTART_DATA)], "maxLength": 128},
            "method": {"name": "full"},
            "training": {"maxSteps": steps, "batchSize": 4, "learningRate": 5e-3, "logEverySteps": 1,
                         "evaluation": {"everyEpoch": False}},
            "output": {"uri": output},
        },
    }


def readme_quickstart_command() -> str:
    """The command of the README's first code block (its quickstart)."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
    assert block is not None, "README.md has no code block"
    return block.group(1).strip()
