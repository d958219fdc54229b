"""The test harness: it plays Kubeflow's training operator and the kubelet + Deployment controller.

Training operator: for each PyTorchJob it starts every replica's real container command as local
processes, with the env Kubeflow injects (MASTER_ADDR/PORT, WORLD_SIZE, RANK, PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK), restarts failed replicas up to `runPolicy.backoffLimit`, and writes
the job's status conditions (Created, Running, Restarting, Succeeded, Failed). With `run_training=False`
it only writes Created/Running and the test decides the outcome (`finish_job`), standing in for a
training operator whose pods we do not run.

Deployment controller + kubelet: pods of the current template start (the container's command, or, with
`run_servers=False`, a readiness the test decides per model URI), old pods are stopped only as new ones
become Ready (maxUnavailable 0), readiness comes from the pod's readinessProbe, and the Deployment status
is written like the controller does. `endpoints(service)` lists the Ready pods a Service selects. With
`run_servers=True` each server pod also exists as a Pod object in the API (labels of its template, `podIP`
127.0.0.1, the `http` container port remapped to the local port the process listens on, a Ready condition),
so a client that reads Pods, such as the operator talking to canary pods directly, reaches the process.

Faults: `fault_after(model_uri)` → N makes the server pods of that model answer their first N chat
completions and fail every later one with HTTP 500 (an exception raised inside the app by a
`sitecustomize` the harness puts on the pod's PYTHONPATH), so the server's own metrics count the errors.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from local_pods import LocalPod, free_port

JOBS = "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs"
DEPLOYMENTS = "/apis/apps/v1/namespaces/{ns}/deployments"
PODS = "/api/v1/namespaces/{ns}/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}
FAULT_ENV = "GLMTUNE_TEST_FAULT_AFTER"
# Raised in the app (inside the server's access-log middleware), so the server records the 500 itself.
FAULT_SITECUSTOMIZE = """
import os

_AFTER = int(os.environ["GLMTUNE_TEST_FAULT_AFTER"])
_SEEN = [0]


def _install():
    from starlette.routing import Router

    original = Router.__call__

    async def faulty(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path") == "/v1/chat/completions":
            _SEEN[0] += 1
            if _SEEN[0] > _AFTER:
                raise RuntimeError("fault injected by the test harness")
        await original(self, scope, receive, send)

    Router.__call__ = faulty


_install()
"""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Job:
    name: str
    body: dict[str, Any]
    pods: list[LocalPod] = field(default_factory=list)
    restarts: int = 0
    state: str = ""


@dataclass
class ServerPod:
    template_hash: str
    model_uri: str
    pod: LocalPod | None
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    restarts: int = 0
    name: str = ""
    """Name of its Pod object in the API ("" when the harness keeps none)."""
    published_ready: bool | None = None


class Harness:
    """Plays the cluster's controllers for one namespace; `start()` runs it in a thread until `stop()`."""

    def __init__(self, api_url: str, namespace: str, workdir: Path, *, run_training: bool = True,
                 run_servers: bool = True, ready_when: Callable[[str], bool] = lambda uri: True,
                 fault_after: Callable[[str], int | None] = lambda uri: None, poll: float = 0.25) -> None:
        self.api = httpx.Client(base_url=api_url, timeout=30)
        self.namespace, self.workdir, self.poll = namespace, workdir, poll
        self.run_training, self.run_servers, self.ready_when = run_training, run_servers, ready_when
        self.fault_after = fault_after
        self.jobs: dict[str, Job] = {}
        self.servers: dict[str, list[ServerPod]] = {}
        self.job_log: list[str] = []
        """Names of jobs in the order the harness first saw them (a duplicate would show up twice)."""
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cluster-harness", daemon=True)
        self.errors: list[str] = []

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> Harness:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            for job in self.jobs.values():
                for pod in job.pods:
                    pod.stop(grace=5)
            for pods in self.servers.values():
                for server in pods:
                    if server.pod is not None:
                        server.pod.stop(grace=5)
        self.api.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._sync_jobs()
                    self._sync_deployments()
            except httpx.HTTPError as exc:  # the API server going away at teardown
                self.errors.append(repr(exc))
            self._stop.wait(self.poll)

    # ---- training operator ---------------------------------------------------------------------------
    def _sync_jobs(self) -> None:
        items = self.api.get(JOBS.format(ns=self.namespace)).json()["items"]
        present = {item["metadata"]["name"] for item in items}
        for name in list(self.jobs):
            if name not in present:  # deleted (superseded run, owner GC): its pods go too
                for pod in self.jobs.pop(name).pods:
                    pod.stop(grace=5)
        for item in items:
            name = item["metadata"]["name"]
            if name not in self.jobs:
                self.jobs[name] = Job(name, item)
                self.job_log.append(name)
                self._write_job(name, "Created", "PyTorchJob is created.")
                if item["spec"].get("runPolicy", {}).get("suspend"):
                    self._write_job(name, "Suspended", "PyTorchJob is suspended.")  # no pods
                else:
                    self._run(self.jobs[name])
            elif self.jobs[name].state == "Suspended" and not item["spec"].get("runPolicy", {}).get("suspend"):
                self.jobs[name].body = item
                self._run(self.jobs[name])
            elif self.run_training and self.jobs[name].state in ("Running", "Restarting"):
                self._watch_replicas(self.jobs[name])

    def _run(self, job: Job) -> None:
        if self.run_training:
            self._launch(job)
        else:
            self._write_job(job.name, "Running", "PyTorchJob is running.")

    def _launch(self, job: Job) -> None:
        """Start every replica of the job: Master rank 0, Worker i rank i+1 (Kubeflow's env injection)."""
        specs = job.body["spec"]["pytorchReplicaSpecs"]
        nnodes = sum(spec["replicas"] for spec in specs.values())
        nproc = job.body["spec"].get("nprocPerNode", "1")
        master_port = free_port()
        job.pods = []
        for kind in ("Master", "Worker"):
            for index in range(specs.get(kind, {}).get("replicas", 0)):
                rank = index + (1 if kind == "Worker" else 0)
                injected = {"PYTHONUNBUFFERED": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
                            "WORLD_SIZE": str(nnodes * int(nproc)), "RANK": str(rank), "PET_NNODES": str(nnodes),
                            "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": str(rank)}
                root = self.workdir / "pods" / f"{job.name}-{kind.lower()}-{index}-{job.restarts}"
                pod = LocalPod(self.api, self.namespace, specs[kind]["template"]["spec"], root,
                               self.workdir / "pvc", injected)
                pod.start()
                job.pods.append(pod)
        self._write_job(job.name, "Running", "PyTorchJob is running.")

    def _watch_replicas(self, job: Job) -> None:
        codes = [pod.exit_code() for pod in job.pods]
        if any(code not in (None, 0) for code in codes):
            for pod in job.pods:
                pod.stop(grace=5)
            tail = next(pod.tail(15) for pod in job.pods if pod.exit_code() not in (None, 0))
            if job.restarts >= job.body["spec"].get("runPolicy", {}).get("backoffLimit", 3):
                self._write_job(job.name, "Failed", f"replica failed after {job.restarts} restarts: {tail}")
                return
            job.restarts += 1
            self._write_job(job.name, "Restarting", f"a replica exited with {codes}; restarting")
            self._launch(job)
        elif job.pods and all(code == 0 for code in codes):
            self._write_job(job.name, "Succeeded", "PyTorchJob is successfully completed.")

    def finish_job(self, name: str, state: str, message: str = "") -> None:
        """Scripted outcome for a job whose pods the harness does not run (Succeeded, Failed, Restarting)."""
        with self._lock:
            self._write_job(name, state, message or f"PyTorchJob is {state.lower()}.")

    def _write_job(self, name: str, state: str, message: str) -> None:
        job = self.jobs[name]
        job.state = state
        current = self.api.get(f"{JOBS.format(ns=self.namespace)}/{name}").json().get("status") or {}
        conditions = [c for c in current.get("conditions") or [] if c["type"] != state]
        if state in ("Succeeded", "Failed", "Restarting"):
            conditions = [{**c, "status": "False"} if c["type"] == "Running" else c for c in conditions]
        if state == "Running":
            conditions = [{**c, "status": "False"} if c["type"] in ("Restarting", "Suspended") else c
                          for c in conditions]
        conditions.append({"type": state, "status": "True", "reason": f"PyTorchJob{state}", "message": message,
                           "lastUpdateTime": _now(), "lastTransitionTime": _now()})
        replicas = job.body["spec"]["pytorchReplicaSpecs"]
        done = state in ("Succeeded", "Failed")
        status = {"conditions": conditions, "startTime": current.get("startTime", _now()),
                  "replicaStatuses": {kind: {"active": 0 if done else spec["replicas"],
                                             "succeeded": spec["replicas"] if state == "Succeeded" else 0,
                                             "failed": 1 if state == "Failed" else 0}
                                      for kind, spec in replicas.items()}}
        if done:
            status["completionTime"] = _now()
        self.api.patch(f"{JOBS.format(ns=self.namespace)}/{name}/status", json={"status": status},
                       headers={"Content-Type": "application/merge-patch+json"}).raise_for_status()

    # ---- deployment controller + kubelet -------------------------------------------------------------
    def _sync_deployments(self) -> None:
        items = self.api.get(DEPLOYMENTS.format(ns=self.namespace)).json()["items"]
        for name in set(self.servers) - {item["metadata"]["name"] for item in items}:
            for server in self.servers.pop(name):
                self._stop_server(server)
        for item in items:
            self._sync_deployment(item)

    def _sync_deployment(self, deployment: dict[str, Any]) -> None:
        name, spec = deployment["metadata"]["name"], deployment["spec"]
        template = spec["template"]
        digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
        container = template["spec"]["containers"][0]
        uri = next(e["value"] for e in container["env"] if e["name"] == "GLMTUNE_MODEL_URI")
        pods = self.servers.setdefault(name, [])
        current = [p for p in pods if p.template_hash == digest]
        while len(current) < spec["replicas"]:
            pod_name = f"{name}-{digest}-{secrets.token_hex(3)}"
            root = self.workdir / "pods" / pod_name
            pod = LocalPod(self.api, self.namespace, template["spec"], root, self.workdir / "pvc",
                           self._fault_env(uri, root))
            server = ServerPod(digest, uri, pod)
            if self.run_servers:
                pod.start()
                server.name = pod_name
                self._publish_pod(server, template)
            pods.append(server)
            current.append(server)
        for server in current:
            self._probe(server, container)
            self._publish_ready(server)
        ready_new = sum(server.ready for server in current[: spec["replicas"]])
        old = [p for p in pods if p.template_hash != digest]
        keep = max(0, spec["replicas"] - ready_new)  # maxUnavailable 0: old Ready pods stay until replaced
        keep_old = sorted(old, key=lambda p: not p.ready)[:keep]
        for server in old:
            if server not in keep_old or not server.ready:
                self._stop_server(server)
                pods.remove(server)
        self._write_deployment(deployment, pods, digest)

    def _fault_env(self, uri: str, root: Path) -> dict[str, str]:
        after = self.fault_after(uri)
        if after is None:
            return {}
        folder = root / "fault"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(FAULT_SITECUSTOMIZE)
        return {"PYTHONPATH": str(folder), FAULT_ENV: str(after)}

    def _publish_pod(self, server: ServerPod, template: dict[str, Any]) -> None:
        """The pod as the API shows it: template labels, its IP, container ports as this machine maps them."""
        spec = json.loads(json.dumps(template["spec"]))
        for port in spec["containers"][0].get("ports", []):
            port["containerPort"] = server.pod.ports[port["containerPort"]]
        body = {"apiVersion": "v1", "kind": "Pod", "spec": spec,
                "metadata": {"name": server.name, "labels": template["metadata"].get("labels", {})}}
        self.api.post(PODS.format(ns=self.namespace), json=body).raise_for_status()

    def _publish_ready(self, server: ServerPod) -> None:
        if not server.name or server.published_ready == server.ready:
            return
        flag = "True" if server.ready else "False"
        status = {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
                  "conditions": [{"type": "Ready", "status": flag}, {"type": "ContainersReady", "status": flag}]}
        self.api.patch(f"{PODS.format(ns=self.namespace)}/{server.name}/status", json={"status": status},
                       headers=MERGE).raise_for_status()
        server.published_ready = server.ready

    def _stop_server(self, server: ServerPod) -> None:
        if server.pod is not None:
            server.pod.stop(grace=5)
        if server.name:
            self.api.delete(f"{PODS.format(ns=self.namespace)}/{server.name}")

    def _probe(self, server: ServerPod, container: dict[str, Any]) -> None:
        if not self.run_servers:
            server.ready = self.ready_when(server.model_uri)
            return
        if server.pod.exit_code() is not None:  # crashed: restartPolicy Always, with a short backoff
            server.ready = False
            if time.monotonic() - server.started > 2 * (server.restarts + 1):
                server.restarts += 1
                server.started = time.monotonic()
                server.pod.start()
            return
        server.ready = server.pod.probe(container.get("readinessProbe"))

    def _write_deployment(self, deployment: dict[str, Any], pods: list[ServerPod], digest: str) -> None:
        ready = sum(p.ready for p in pods)
        updated = sum(p.template_hash == digest for p in pods)
        replicas = deployment["spec"]["replicas"]
        status = {"observedGeneration": deployment["metadata"]["generation"], "replicas": len(pods),
                  "updatedReplicas": updated, "readyReplicas": ready, "availableReplicas": ready,
                  "unavailableReplicas": max(0, replicas - ready),
                  "conditions": [
                      {"type": "Available", "status": "True" if ready >= replicas else "False",
                       "reason": "MinimumReplicasAvailable" if ready >= replicas else "MinimumReplicasUnavailable"},
                      {"type": "Progressing", "status": "True",
                       "reason": "NewReplicaSetAvailable" if updated == len(pods) == ready else "ReplicaSetUpdated"},
                  ]}
        if deployment.get("status") == status:
            return
        self.api.patch(f"{DEPLOYMENTS.format(ns=self.namespace)}/{deployment['metadata']['name']}/status",
                       json={"status": status},
                       headers={"Content-Type": "application/merge-patch+json"}).raise_for_status()

    # ---- what tests look at --------------------------------------------------------------------------
    def endpoints(self, service: str) -> list[str]:
        """Base URLs of the Ready pods the Service selects (what kube-proxy would balance over)."""
        svc = self.api.get(f"/api/v1/namespaces/{self.namespace}/services/{service}").json()
        selector, port_name = svc["spec"]["selector"], svc["spec"]["ports"][0]["targetPort"]
        with self._lock:
            deployments = self.api.get(DEPLOYMENTS.format(ns=self.namespace)).json()["items"]
            urls = []
            for deployment in deployments:
                labels = deployment["spec"]["template"]["metadata"]["labels"]
                if all(labels.get(k) == v for k, v in selector.items()):
                    urls += [p.pod.url(port_name) for p in self.servers.get(deployment["metadata"]["name"], [])
                             if p.ready and p.pod is not None]
            return urls

    def served_models(self, deployment: str) -> list[tuple[str, bool]]:
        """(model URI, ready) of every pod of a Deployment right now."""
        with self._lock:
            return [(p.model_uri, p.ready) for p in self.servers.get(deployment, [])]

    def job_logs(self, name: str) -> str:
        with self._lock:
            job = self.jobs.get(name)
            return "\n".join(pod.tail(40) for pod in job.pods) if job else ""
