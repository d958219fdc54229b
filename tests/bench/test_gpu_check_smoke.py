"""bench/gpu_check.sh --cpu-smoke: the prepared GPU check runs every step on a tiny model on the CPU, so the
script a GPU session runs in its few minutes of device time cannot rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_and_appends_its_table(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--results", str(results)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = results.read_text()
    assert "SMOKE run" in table and "result: smoke run finished" in table
    assert "1. `gpu`-marked tests: " in table and "(exit status 0)" in table
    for step in ("2. dequantization kernels", "3. peak memory of one step", "4. LoRA r8 bf16 training",
                 "5. serving through the batching engine"):
        assert step in table
    assert "| lora-int4 |" in table and "| ptv2-int4 |" in table and "| int4 |" in table
    assert not (REPO / "bench" / "RESULTS.md").read_text().endswith(table[-200:])  # the repo's file is untouched
