"""Two "nodes" on one machine (two torchrun launches, 1 process each, gloo): with a work dir per node, as in
a PyTorchJob's emptyDir pods, or one shared work dir, training follows single-process training's loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from glmtune_trainer.checkpoint import STATE_FILE, step_dir_name
from glmtune_trainer.metrics import read_metrics
from glmtune_trainer.run import train_spec
from testkit import REPO_ROOT

from .conftest import free_port, spec_mapping

LAUNCH_TIMEOUT_S = 300


def _losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir / "logs", "train")}


def _launch_two_nodes(spec_file: Path, workdirs: list[Path], overrides: list[str]) -> list[subprocess.CompletedProcess]:
    """Start node 0 and node 1 (same static rendezvous), wait for both within the bound, kill what is left."""
    port = free_port()
    procs, logs = [], []
    try:
        for node, workdir in enumerate(workdirs):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
                   "GLMTUNE_CACHE": str(workdir.parent / f"cache-node{node}")}
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                       f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                       "-m", "glmtune_trainer", str(spec_file), "--workdir", str(workdir),
                       *(item for override in overrides for item in ("--set", override))]
            log = open(workdir.parent / f"node{node}.log", "w+", encoding="utf-8")  # noqa: SIM115
            logs.append(log)
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        codes = [proc.wait(timeout=LAUNCH_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its rank: nothing outlives the test
                proc.wait(timeout=30)
    results = []
    for node, (code, log) in enumerate(zip(codes, logs, strict=True)):
        log.seek(0)
        results.append(subprocess.CompletedProcess([f"node{node}"], code, log.read(), ""))
        log.close()
    return results


@pytest.fixture
def qa_data(tmp_path: Path) -> Path:
    """16 samples: two ranks of batch 2 see exactly what one process of batch 4 sees (no epoch-end padding)."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"问题 {i} 是什么？", "output": f"答案是 {i * 7}。"},
                                       ensure_ascii=False) + "\n" for i in range(16)), encoding="utf-8")
    return data


def _specs(tiny_model, tmp_path: Path, data: Path) -> tuple[dict, dict]:
    # A constant learning rate, so stopping at step 3 and continuing to step 5 is the same run as 5 at once.
    common = {"learningRate": 1e-2, "scheduler": "constant", "checkpoint": {"everySteps": 1}}
    single = spec_mapping(tiny_model("v2"), tmp_path / "single-export", "lora", batchSize=4, maxSteps=5, **common)
    multi = spec_mapping(tiny_model("v2"), tmp_path / "multi-export", "lora", batchSize=2, maxSteps=3, **common)
    for mapping in (single, multi):
        mapping["spec"]["method"]["lora"] = {"dropout": 0.0}
        mapping["spec"]["data"]["sources"] = [str(data)]
    return single, multi


@pytest.mark.slow
def test_nodes_with_their_own_work_dirs_prepare_checkpoint_and_resume_locally(tiny_model, tmp_path: Path,
                                                                            qa_data: Path) -> None:
    from glmtune.spec import spec_from_mapping

    single, multi = _specs(tiny_model, tmp_path, qa_data)
    train_spec(spec_from_mapping(single, "single"), tmp_path / "single")
    expected = _losses(tmp_path / "single")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(multi))
    workdirs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    for workdir in workdirs:
        workdir.mkdir(parents=True)

    for run in _launch_two_nodes(spec_file, workdirs, []):
        assert run.returncode == 0, f"{run.args[0]}:\n{run.stdout[-4000:]}"
    got = _losses(workdirs[0])
    assert sorted(got) == [1, 2, 3]
    assert [got[s] for s in (1, 2, 3)] == pytest.approx([expected[s] for s in (1, 2, 3)], abs=1e-4)
    for workdir in workdirs:
        # Each node prepared its own base-model marker and records, and holds a complete checkpoint of its own.
        assert json.loads((workdir / ".prepared-records.json").read_text())["value"] == str(workdir / "records")
        assert (workdir / "records" / "manifest.json").is_file()
        final = workdir / "checkpoints" / step_dir_name(3)
        assert {STATE_FILE, "model.safetensors", "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt"} <= {
            p.name for p in final.iterdir()}
        assert not list(workdir.glob(".node-probe-*"))
    assert (tmp_path / "multi-export" / "glmtune-manifest.json").is_file()

    # Continue to step 5: each node resumes from the step-3 checkpoint on its own disk.
    for run in _launch_two_nodes(spec_file, workdirs, ["training.maxSteps=5"]):
        assert run.returncode == 0, f"{run.args[0]}:\n{run.stdout[-4000:]}"
    got = _losses(workdirs[0])
    assert [got[s] for s in range(1, 6)] == pytest.approx([expected[s] for s in range(1, 6)], abs=1e-4)
    assert (workdirs[1] / "checkpoints" / step_dir_name(5) / STATE_FILE).is_file()


@pytest.mark.slow
def test_nodes_sharing_one_work_dir_match_single_process(tiny_model, tmp_path: Path,
                                                                         qa_data: Path) -> None:
    from glmtune.spec import spec_from_mapping

    single, multi = _specs(tiny_model, tmp_path, qa_data)
    single["spec"]["training"]["maxSteps"] = 3
    train_spec(spec_from_mapping(single, "single"), tmp_path / "single")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(multi))
    shared = tmp_path / "shared" / "run"
    shared.mkdir(parents=True)

    for run in _launch_two_nodes(spec_file, [shared, shared], []):
        assert run.returncode == 0, f"{run.args[0]}:\n{run.stdout[-4000:]}"
    expected, got = _losses(tmp_path / "single"), _losses(shared)
    assert [got[s] for s in (1, 2, 3)] == pytest.approx([expected[s] for s in (1, 2, 3)], abs=1e-4)
    assert (shared / "checkpoints" / step_dir_name(3) / "rng-rank1.pt").is_file()
    assert not (shared / "checkpoints" / f".tmp-{step_dir_name(3)}").exists()


ROLES_SCRIPT = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from glmtune_trainer.distributed import read_topology, work_dir_roles
rank, world, store, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
topology = read_topology({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "GROUP_RANK": str(rank)})
roles = work_dir_roles(topology, workdir)
print(json.dumps([roles.writer, roles.owner_node, roles.all_shared]))
dist.destroy_process_group()
"""


def test_each_work_dir_gets_one_writer_the_lowest_node_that_sees_it(tmp_path: Path) -> None:
    # Node 0 alone; nodes 1 and 2 share one folder (a volume node 0 does not mount).
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "b"]
    for folder in dirs:
        folder.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", ROLES_SCRIPT, str(rank), "3", str(tmp_path / "store"),
                               str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, folder in enumerate(dirs)]
    try:
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _out, err in outputs]
    roles = [json.loads(out) for out, _err in outputs]
    assert roles == [[True, 0, False], [True, 1, False], [False, 1, False]]
    assert not list(tmp_path.glob("*/.node-probe-*"))


@pytest.mark.slow
def test_zero_across_nodes_without_a_shared_work_dir_fails_at_start(tiny_model, tmp_path: Path, qa_data: Path) -> None:
    _single, multi = _specs(tiny_model, tmp_path, qa_data)
    multi["spec"]["training"]["deepspeed"] = {"stage": 2}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(multi))
    workdirs = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    for workdir in workdirs:
        workdir.mkdir(parents=True)

    for run in _launch_two_nodes(spec_file, workdirs, []):
        assert run.returncode != 0
        assert "spec.training.deepspeed" in run.stdout and "ReadWriteMany" in run.stdout, run.stdout[-3000:]
    for workdir in workdirs:
        assert not (workdir / "records").exists() and not (workdir / "checkpoints").exists()
