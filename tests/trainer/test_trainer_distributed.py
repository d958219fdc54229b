"""Two real processes on gloo (torchrun): DDP and DeepSpeed ZeRO-2/3 follow single-process training's loss curve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from glmtune_trainer.distributed import read_topology, torchrun_command
from glmtune_trainer.metrics import read_metrics
from glmtune_trainer.run import train_spec
from testkit import REPO_ROOT

from .conftest import free_port, spec_mapping


def _losses(workdir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(workdir / "logs", "train")]


def _train_single_then_write_multi(single: dict, multi: dict, stage: int | None, tmp_path: Path) -> Path:
    """Train `single` in-process into tmp_path/single; write `multi` (on DeepSpeed `stage` if given) as the
    two-process run's spec file and return it."""
    from glmtune.spec import spec_from_mapping

    if stage is not None:
        multi["spec"]["training"]["deepspeed"] = {"stage": stage}
    train_spec(spec_from_mapping(single, "single"), tmp_path / "single")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(multi))
    return spec_file


def _torchrun(spec_file: Path, workdir: Path, extensions_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a 2-process torchrun of `spec_file` (no inherited rank variables)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "glmtune_trainer", str(spec_file), "--workdir", str(workdir)]
    return command, env


@pytest.mark.slow
@pytest.mark.parametrize(("method", "stage"), [("lora", None), ("full", None), ("lora", 2), ("full", 2),
                                               ("lora", 3), ("full", 3)])
def test_two_processes_match_single_process_with_the_same_global_batch(tiny_model, tmp_path: Path,
                                                                       extensions_dir: Path, method: str,
                                                                       stage: int | None) -> None:
    common = {"maxSteps": 3, "learningRate": 1e-2}
    method_settings = {"dropout": 0.0} if method == "lora" else None
    single = spec_mapping(tiny_model("v2"), tmp_path / "single-export", method, batchSize=4, **common)
    multi = spec_mapping(tiny_model("v2"), tmp_path / "multi-export", method, batchSize=2, **common)
    for mapping in (single, multi):
        if method_settings:
            mapping["spec"]["method"]["lora"] = method_settings
    spec_file = _train_single_then_write_multi(single, multi, stage, tmp_path)
    command, env = _torchrun(spec_file, tmp_path / "multi", extensions_dir)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=570)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert len(got) == len(expected) == 3
    assert got == pytest.approx(expected, rel=1e-4)
    assert (tmp_path / "multi-export" / "glmtune-manifest.json").is_file()


def test_pytorchjob_environment_relaunches_under_torchrun() -> None:
    env = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1",
           "PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "1"}
    command = torchrun_command(["spec.yaml", "--set", "training.maxSteps=5"], env)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--master_addr=job-master-0",
            "--master_port=23456"} <= set(command)
    assert command[-5:] == ["-m", "glmtune_trainer", "spec.yaml", "--set", "training.maxSteps=5"]
    # Under torchrun (LOCAL_RANK set) nothing is relaunched, and the per-process topology is read.
    assert torchrun_command([], {**env, "LOCAL_RANK": "3"}) is None
    topology = read_topology({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (topology.rank, topology.world_size, topology.local_rank, topology.is_main) == (5, 8, 1, False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [None, 2])
def test_two_process_run_killed_and_resumed_keeps_the_loss_curve(tiny_model, tmp_path: Path,
                                                                  extensions_dir: Path, stage: int | None) -> None:
    import json
    import signal
    import time

    # 16 samples split evenly over 2 ranks: no rank pads its share with a repeated sample at epoch ends.
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"问题 {i} 是什么？", "output": f"答案是 {i * 7}。"},
                                       ensure_ascii=False) + "\n" for i in range(16)))
    # Enough steps that the run cannot finish inside one polling interval once three are logged (a fast
    # machine did 4 steps in one 50 ms sleep with maxSteps 6).
    steps = 20
    common = {"maxSteps": steps, "learningRate": 1e-2, "checkpoint": {"everySteps": 1}}
    single = spec_mapping(tiny_model("v2"), tmp_path / "single-export", "lora", batchSize=4, **common)
    multi = spec_mapping(tiny_model("v2"), tmp_path / "multi-export", "lora", batchSize=2, **common)
    for mapping in (single, multi):
        mapping["spec"]["method"]["lora"] = {"dropout": 0.0}
        mapping["spec"]["data"]["sources"] = [str(data)]
    spec_file = _train_single_then_write_multi(single, multi, stage, tmp_path)

    def launch() -> subprocess.Popen:
        command, env = _torchrun(spec_file, tmp_path / "multi", extensions_dir)
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    victim = launch()
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and victim.poll() is None:
        if (tmp_path / "multi" / "logs").exists() and len(_losses(tmp_path / "multi")) >= 3:
            break
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks, as a preempted pod
    victim.wait(timeout=30)
    assert 3 <= len(_losses(tmp_path / "multi")) < steps
    assert launch().wait(timeout=500) == 0
    logged = read_metrics(tmp_path / "multi" / "logs", "train")
    by_step = {m["step"]: m["loss"] for m in logged}  # a re-run step overwrites the killed run's entry
    assert [by_step[s] for s in range(1, steps + 1)] == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
