"""Fixtures of the operator tests: the Kubernetes emulator, moto S3, the operator process and the harness.

Everything listens on 127.0.0.1, every wait is bounded, and every process is stopped at teardown.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules next to this file

from cluster_harness import Harness  # noqa: E402
from kube_runtime import EmulatedCluster  # noqa: E402
from local_pods import free_port  # noqa: E402
from operator_testkit import NAMESPACE, kubeflow_crd, wait_for  # noqa: E402
from testkit import REPO_ROOT  # noqa: E402

MOTO_KEY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="session")
def pytorchjob_crd() -> dict[str, Any]:
    return kubeflow_crd()


@pytest.fixture
def cluster(pytorchjob_crd: dict[str, Any]) -> Iterator[EmulatedCluster]:
    """A fresh API server with the GLMFineTune and PyTorchJob CRDs and the namespace `ml`."""
    from glmtune.crd import build_crd

    running = EmulatedCluster().start()
    running.call(lambda e: e.put("v1/namespaces", {"metadata": {"name": NAMESPACE}}))
    running.call(lambda e: e.register_crd(build_crd()))
    running.call(lambda e: e.register_crd(pytorchjob_crd))
    yield running
    running.stop()


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    """A boto3 client on moto; tests create uniquely named buckets with `new_bucket`."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def new_bucket(s3: Any) -> Callable[[str], str]:
    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture
def s3_secret(cluster: EmulatedCluster) -> str:
    """A Secret with moto's credentials in namespace `ml`; returns its name."""
    data = {key: base64.b64encode(value.encode()).decode() for key, value in MOTO_KEY.items()}
    cluster.call(lambda e: e.put("v1/secrets", {"metadata": {"name": "s3-creds", "namespace": NAMESPACE},
                                                "type": "Opaque", "data": data}))
    return "s3-creds"


class OperatorProcess:
    """`glmtune operator` as a subprocess against the emulator (kopf runs for real)."""

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str]) -> None:
        self.kubeconfig, self.log_path, self.extra_env = kubeconfig, log, env
        self.process: subprocess.Popen | None = None
        self.liveness = free_port()
        self.metrics = free_port()

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "GLMTUNE_METRICS_BIND": f"127.0.0.1:{self.metrics}",
               "GLMTUNE_PROGRESS_INTERVAL_SECONDS": "0.3", "GLMTUNE_DATA_DEBOUNCE_SECONDS": "0",
               "GLMTUNE_TRAINER_IMAGE": "glmtune-train:test", "GLMTUNE_SERVER_IMAGE": "glmtune-serve:test",
               **self.extra_env}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "glmtune_app.cli", "operator", "--standalone", f"--namespace={NAMESPACE}",
                 f"--liveness=http://127.0.0.1:{self.liveness}/healthz", "--verbose"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        wait_for(self.alive, 60, "the operator's liveness endpoint", self.tail)
        return self

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            pytest.fail(f"the operator exited\n{self.tail()}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.liveness}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 when absent)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).text
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} ") or (not labels and line.startswith(f"{name} ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def operator(cluster: EmulatedCluster, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """`operator(**env)` starts the operator (once per call); every started one is stopped at teardown."""
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig", NAMESPACE)
    started: list[OperatorProcess] = []

    def start(**env: str) -> OperatorProcess:
        process = OperatorProcess(kubeconfig, tmp_path / f"operator-{len(started)}.log", env).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def harness(cluster: EmulatedCluster, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """`harness(**options)` starts the training-operator/kubelet stand-in; stopped (with its pods) at teardown."""
    started: list[Harness] = []

    def start(**options: Any) -> Harness:
        running = Harness(cluster.url, NAMESPACE, tmp_path / "harness", **options).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
