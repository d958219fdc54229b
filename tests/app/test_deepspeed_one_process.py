"""`glmtune run` of the quickstart under DeepSpeed in one process with no launcher, as a new user runs it.

DeepSpeed needs torch.distributed; with no RANK / WORLD_SIZE / MASTER_* set it used to fall back to MPI
discovery and die on `import mpi4py`. The trainer now gives a lone process a world of one itself, and any
failure of that start-up reaches the user as one line (exit 1), with the traceback only under --debug.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from glmtune_app.cli import main
from glmtune_trainer.metrics import read_metrics
from testkit import REPO_ROOT

QUICKSTART = REPO_ROOT / "examples" / "quickstart.yaml"
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# No warmup: every step updates at the full learning rate, so a wrong update shows in the next step's loss.
SHORT_RUN = ("training.maxSteps=4", "training.warmupSteps=0", "training.logEverySteps=1")


@pytest.fixture(scope="module")
def no_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No rendezvous variables (a plain shell), the repository as working directory (the quickstart's
    relative paths), and DeepSpeed's CPU ops compiled once per session outside ~/.cache."""
    # The folder tests/trainer's extensions_dir fixture names, so a session compiles each op once.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.getbasetemp() / "torch-extensions")
    with pytest.MonkeyPatch.context() as patch:
        for name in RENDEZVOUS:
            patch.delenv(name, raising=False)
        patch.setenv("TORCH_EXTENSIONS_DIR", extensions)
        patch.chdir(REPO_ROOT)
        yield


def run_quickstart(workdir: Path, *settings: str, debug: bool = False) -> int:
    """`glmtune [--debug] run examples/quickstart.yaml --set ...` in this process; returns its exit code."""
    argv = ["--debug"] if debug else []
    argv += ["run", str(QUICKSTART), "--workdir", str(workdir)]
    for setting in (*SHORT_RUN, *settings):
        argv += ["--set", setting]
    return main(argv)


def train_losses(workdir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(workdir / "logs", "train")]


@pytest.fixture(scope="module")
def plain_losses(no_launcher: None, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The loss curve of the same run on the plain engine (no DeepSpeed)."""
    workdir = tmp_path_factory.mktemp("plain")
    assert run_quickstart(workdir) == 0
    return train_losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [
    {"stage": 0}, {"stage": 1}, {"stage": 2}, {"stage": 3},
    {"stage": 2, "offloadOptimizer": True},
    {"stage": 3, "offloadOptimizer": True, "offloadParams": True},
], ids=["zero0", "zero1", "zero2", "zero3", "zero2-offload-optimizer", "zero3-offload-optimizer-params"])
def test_quickstart_trains_under_deepspeed_in_one_process_like_the_plain_engine(
        no_launcher: None, plain_losses: list[float], tmp_path: Path, capsys: pytest.CaptureFixture,
        deepspeed: dict) -> None:
    settings = [f"training.deepspeed.{key}={str(value).lower()}" for key, value in deepspeed.items()]
    assert run_quickstart(tmp_path, *settings) == 0, capsys.readouterr().err[-3000:]
    losses = train_losses(tmp_path)
    assert len(losses) == len(plain_losses) == 4
    # fp32 throughout: ZeRO partitions the same arithmetic (DeepSpeed's CPU Adam under offloadOptimizer
    # included). Measured: stages 0-2 bit-identical, ZeRO-3 within 2e-7 (its own reduction order).
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert (tmp_path / "export" / "glmtune-manifest.json").is_file()
    # The world of one is gone afterwards, and nothing of it stays in the environment.
    assert not torch.distributed.is_initialized()
    assert not any(name in os.environ for name in RENDEZVOUS)


@pytest.mark.slow
def test_offload_with_an_optimizer_deepspeed_has_no_cpu_version_of_trains_like_the_plain_engine(
        no_launcher: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Lion runs as the client optimizer on the CPU (zero_force_ds_cpu_optimizer: false), element by element.
    lion = ("training.optimizer=lion", "training.learningRate=5e-4")
    assert run_quickstart(tmp_path / "plain", *lion) == 0, capsys.readouterr().err[-3000:]
    offload = ("training.deepspeed.stage=2", "training.deepspeed.offloadOptimizer=true")
    assert run_quickstart(tmp_path / "offload", *lion, *offload) == 0, capsys.readouterr().err[-3000:]
    assert train_losses(tmp_path / "offload") == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-5)


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_a_failed_process_group_start_is_one_message_naming_what_to_set(
        no_launcher: None, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        debug: bool) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        monkeypatch.setenv("MASTER_PORT", port)  # left over in the user's shell
        code = run_quickstart(tmp_path, "training.deepspeed.stage=0", debug=debug)
    err = capsys.readouterr().err
    assert code == 1
    assert "glmtune run: error: torch.distributed could not start" in err
    assert f"MASTER_PORT={port}" in err and "address already in use" in err
    assert "unset them and glmtune picks a free port" in err
    assert ("Traceback" in err) == debug
    assert not torch.distributed.is_initialized()
    assert os.environ["MASTER_PORT"] == port and "RANK" not in os.environ  # the user's environment, as it was


@pytest.mark.slow  # DeepSpeed builds its shared-memory op once per session (~1 min) before refusing
@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed refuses fp16 only on its CPU accelerator")
def test_deepspeed_refusing_the_spec_is_one_message_and_the_traceback_only_with_debug(
        no_launcher: None, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_quickstart(tmp_path, "training.deepspeed.stage=2", "training.precision=fp16") == 1
    err = capsys.readouterr().err
    assert "glmtune run: error: DeepSpeed ZeRO-2 failed to start: ValueError: Type fp16 is not supported" in err
    assert "training.precision" in err and "Traceback" not in err
    assert run_quickstart(tmp_path, "training.deepspeed.stage=2", "training.precision=fp16", debug=True) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "deepspeed" in err and "failed to start" in err
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_cpu_adam_that_cannot_be_built_is_one_message_naming_the_setting(tmp_path: Path) -> None:
    # A fresh process: DeepSpeed keeps an op it loaded once for the life of the process.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    env = {name: value for name, value in os.environ.items() if name not in RENDEZVOUS}
    env["TORCH_EXTENSIONS_DIR"] = str(blocker / "torch-extensions")
    argv = [sys.executable, "-m", "glmtune_app.cli", "run", str(QUICKSTART), "--workdir", str(tmp_path / "run")]
    for setting in (*SHORT_RUN, "training.deepspeed.stage=2", "training.deepspeed.offloadOptimizer=true"):
        argv += ["--set", setting]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "glmtune run: error: DeepSpeed could not build its CPU Adam op for offloadOptimizer" in done.stderr
    assert "TORCH_EXTENSIONS_DIR" in done.stderr and "training.deepspeed.offloadOptimizer: false" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("argv", "debug"), [
    (["run", "spec.yaml"], False), (["--debug", "run", "spec.yaml"], True), (["run", "spec.yaml", "--debug"], True),
    (["train", "spec.yaml", "--debug"], True), (["data", "build", "in.jsonl", "--tokenizer", "t", "--out", "o", "--debug"], True),
])
def test_debug_is_accepted_before_or_after_the_command(argv: list[str], debug: bool) -> None:
    from glmtune_app.cli import build_parser

    assert build_parser().parse_args(argv).debug is debug
