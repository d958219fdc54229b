"""Checkpoints are atomic and pruned, and a resumed run ends with exactly the weights of an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from glmtune_trainer.checkpoint import list_checkpoints, load_weights
from glmtune_trainer.metrics import read_metrics
from glmtune_trainer.run import train_spec
from testkit import REPO_ROOT

from .conftest import spec_mapping


def _same_weights(a: Path, b: Path) -> bool:
    left, right = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_resume_continues_bit_for_bit(make_spec, tmp_path: Path) -> None:
    settings = {"r": 4, "dropout": 0.1}  # dropout draws random numbers: the RNG state must be restored
    spec = make_spec("lora", method_settings=settings, maxSteps=6, checkpoint={"everySteps": 1, "keepLast": 2})
    straight = train_spec(spec, tmp_path / "straight")
    first = train_spec(spec, tmp_path / "resumed", stop_after=3)
    assert first.export is None and first.metrics["step"] == 3
    resumed = train_spec(spec, tmp_path / "resumed")
    assert resumed.metrics["step"] == 6
    assert _same_weights(straight.checkpoint_dir, resumed.checkpoint_dir)
    # keepLast 2: only the two newest complete checkpoints remain, and no temporary directory.
    root = tmp_path / "resumed" / "checkpoints"
    assert [step for step, _ in list_checkpoints(root)] == [5, 6]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]


def test_resume_never_starts_from_scratch(make_spec, tmp_path: Path) -> None:
    train_spec(make_spec("lora", maxSteps=2), tmp_path / "run")
    again = train_spec(make_spec("lora", maxSteps=2, checkpoint={"resume": "never"}), tmp_path / "run")
    assert len(read_metrics(tmp_path / "run" / "logs", "train")) == 4 and again.metrics["step"] == 2


def test_checkpoints_are_mirrored_to_s3_and_resume_auto_fetches_the_newest(make_spec, tmp_path: Path,
                                                                           s3_bucket: str) -> None:
    mirror = f"s3://{s3_bucket}/ckpt"
    spec = make_spec("lora", maxSteps=4, checkpoint={"everySteps": 2, "mirrorUri": mirror})
    straight = train_spec(make_spec("lora", maxSteps=4), tmp_path / "straight")
    train_spec(spec, tmp_path / "pod-1", stop_after=2)
    # A rescheduled pod starts on an empty disk: only the mirror has the step-2 checkpoint.
    resumed = train_spec(spec, tmp_path / "pod-2")
    assert read_metrics(tmp_path / "pod-2" / "logs", "train")[0]["step"] == 3
    assert _same_weights(straight.checkpoint_dir, resumed.checkpoint_dir)


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_gives_identical_weights(tiny_model, tmp_path: Path) -> None:
    # The kill lands at most at step 10 of 24: steps logged after the poll saw `kill_at` cannot reach the end.
    mapping = spec_mapping(tiny_model("v2"), tmp_path / "export", "full", maxSteps=24, learningRate=1e-2,
                           checkpoint={"everySteps": 1})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(mapping))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}

    def launch(workdir: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "glmtune_trainer", str(spec_file), "--workdir", str(workdir)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    assert launch(tmp_path / "straight").wait(timeout=300) == 0
    victim = launch(tmp_path / "killed")
    kill_at = random.Random().randint(2, 10)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        logged = read_metrics(tmp_path / "killed" / "logs", "train") if (tmp_path / "killed" / "logs").exists() else []
        if logged and logged[-1]["step"] >= kill_at:
            break
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    done = list_checkpoints(tmp_path / "killed" / "checkpoints")
    assert done and done[-1][0] < 24, "the run must be interrupted before its end"
    assert launch(tmp_path / "killed").wait(timeout=300) == 0
    final = tmp_path / "killed" / "checkpoints" / "step-00000024"
    assert _same_weights(tmp_path / "straight" / "checkpoints" / "step-00000024", final)
