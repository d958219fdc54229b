"""Benchmark: N GLMFineTunes applied at once; how fast the operator gives each its PyTorchJob.

Runs the real operator (`glmtune operator`, kopf) against the KMock-based API emulator of the tests on
127.0.0.1; nothing plays the training operator, so jobs stay pending. Measures the time until every
resource has its job, the API requests the operator made per resource, and duplicate jobs (target:
<= 30 s for 100, 0 duplicates). Usage: python bench/bench_operator.py [--count 100] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from results import record

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "operator"))  # the emulator lives with the tests
sys.path.insert(0, str(REPO / "tests"))

from kube_runtime import EmulatedCluster  # noqa: E402
from local_pods import free_port  # noqa: E402
from operator_testkit import kubeflow_crd  # noqa: E402

NAMESPACE = "bench"
FT_PATH = f"/apis/glmtune.io/v1alpha1/namespaces/{NAMESPACE}/glmfinetunes"


def resource(index: int) -> dict:
    return {"apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune",
            "metadata": {"name": f"ft-{index:03d}", "namespace": NAMESPACE},
            "spec": {"model": {"uri": "s3://models/base/chatglm3-6b", "family": "v3"},
                     "data": {"sources": [f"s3://data/team-{index:03d}/"]},
                     "output": {"uri": f"s3://models/out/ft-{index:03d}"},
                     "resources": {"nodes": 2, "gpusPerNode": 8},
                     "s3": {"secretRef": {"name": "s3-creds"}}}}


def start_cluster() -> EmulatedCluster:
    from glmtune.crd import build_crd

    cluster = EmulatedCluster().start()
    cluster.call(lambda e: e.put("v1/namespaces", {"metadata": {"name": NAMESPACE}}))
    cluster.call(lambda e: e.put("v1/secrets", {"metadata": {"name": "s3-creds", "namespace": NAMESPACE},
                                                "data": {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}}))
    cluster.call(lambda e: e.register_crd(build_crd()))
    cluster.call(lambda e: e.register_crd(kubeflow_crd()))
    return cluster


def start_operator(cluster: EmulatedCluster, workdir: Path) -> tuple[subprocess.Popen, Path]:
    kubeconfig = cluster.write_kubeconfig(workdir / "kubeconfig", NAMESPACE)
    liveness = free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GLMTUNE_METRICS_BIND": "off"}
    log = workdir / "operator.log"
    process = subprocess.Popen([sys.executable, "-m", "glmtune_app.cli", "operator", "--standalone",
                                f"--namespace={NAMESPACE}", f"--liveness=http://127.0.0.1:{liveness}/healthz"],
                               env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{liveness}/healthz", timeout=1).status_code == 200:
                return process, log
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the operator did not start:\n{log.read_text()[-3000:]}")


def measure(count: int, settle: float) -> dict:
    cluster = start_cluster()
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    process, log = start_operator(cluster, workdir)
    try:
        before = cluster.call(lambda e: len(e.call_log))
        appeared: dict[str, float] = {}
        start = time.monotonic()
        with httpx.Client(base_url=cluster.url, timeout=30) as api, ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda i: api.post(FT_PATH, json=resource(i)).status_code, range(count)))
        applied = time.monotonic() - start
        if codes.count(201) != count:
            raise SystemExit(f"applying failed: {Counter(codes)}")
        deadline = start + 120
        while len(appeared) < count and time.monotonic() < deadline:
            now = time.monotonic() - start
            for job in cluster.live("kubeflow.org/v1/pytorchjobs", NAMESPACE):
                appeared.setdefault(job["metadata"]["name"], now)
            time.sleep(0.02)
        all_jobs = max(appeared.values()) if len(appeared) == count else float("nan")
        time.sleep(settle)  # let status writes and events land before counting requests
        calls = cluster.call(lambda e: e.call_log[before:])
        jobs = cluster.live("kubeflow.org/v1/pytorchjobs", NAMESPACE)
        creations = cluster.call(lambda e: sum(
            1 for (res, ns, _), obj in e.objects.items() if res.plural == "pytorchjobs" and ns == NAMESPACE
            for version in obj.history if version is not None and version.get("metadata", {}).get("generation") == 1
            and not version.get("status")))
        phases = Counter((ft.get("status") or {}).get("phase") for ft in cluster.live(
            "glmtune.io/v1alpha1/glmfinetunes", NAMESPACE))
    finally:
        process.terminate()
        process.wait(timeout=30)
        cluster.stop()
    operator_calls = [c for c in calls if not c.agent.startswith("python-httpx")]  # not the bench's own
    by_kind = Counter(f"{c.verb} {c.resource}" for c in operator_calls)
    expected = {f"ft-{i:03d}-run-1" for i in range(count)}
    latencies = sorted(appeared.values())
    return {
        "resources": count,
        "apply_seconds": round(applied, 3),
        "all_jobs_seconds": round(all_jobs, 3),
        "job_latency_p50_seconds": round(statistics.median(latencies), 3) if latencies else None,
        "job_latency_p95_seconds": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "jobs": len(jobs),
        "duplicate_jobs": len(jobs) - len({j["metadata"]["name"] for j in jobs} & expected)
        + max(0, creations - len(expected)),
        "missing_jobs": len(expected - {j["metadata"]["name"] for j in jobs}),
        "operator_requests": len(operator_calls),
        "operator_requests_per_resource": round(len(operator_calls) / count, 2),
        "requests_by_kind": dict(sorted(by_kind.items())),
        "phases": dict(phases),
        "operator_log": str(log),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="GLMFineTunes applied at once")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait before counting requests")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    results = measure(args.count, args.settle)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = results["all_jobs_seconds"] <= 30 and results["duplicate_jobs"] == 0 and results["missing_jobs"] == 0
    if not args.no_record:
        rows = "\n".join(f"| {key} | {value} |" for key, value in results.items()
                         if key != "operator_log" and not isinstance(value, dict | list))
        record("bench_operator.py", f"{args.count} GLMFineTunes applied at once to the emulator, real operator "
               f"subprocess, harness not training; targets: all jobs <= 30 s, 0 duplicates\n\n| measure | value |\n"
               f"|---|---|\n{rows}")
    print(f"{'PASS' if ok else 'FAIL'}: {results['resources']} resources -> all jobs in "
          f"{results['all_jobs_seconds']}s, {results['duplicate_jobs']} duplicates, "
          f"{results['operator_requests_per_resource']} API requests per resource", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
