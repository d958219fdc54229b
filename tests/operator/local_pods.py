"""Run a pod's container as a local process, the way the kubelet would start it (for the test harness).

The container's env (values, Secret and ConfigMap references read through the API), `$(VAR)` expansion in
command/args, volumes as local folders (configMap files, emptyDir, PVCs as shared folders) with mount paths
rewritten to them, and each pod's own network: container ports map to free ports on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are replaced, `$$` escapes, others stay as written."""
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class LocalPod:
    """One pod: its folder, volumes, env and (once started) its process; `log` holds stdout+stderr."""

    def __init__(self, api: httpx.Client, namespace: str, pod_spec: dict[str, Any], root: Path,
                 pvc_root: Path, injected_env: dict[str, str] | None = None) -> None:
        self.namespace, self.spec, self.root = namespace, pod_spec, root
        self.container = pod_spec["containers"][0]
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "log.txt"
        self.process: subprocess.Popen | None = None
        self.ports = {p["containerPort"]: free_port() for p in self.container.get("ports", [])}
        self.port_names = {p.get("name"): p["containerPort"] for p in self.container.get("ports", [])}
        self.mounts = self._volumes(api, pvc_root)
        self.env = self._env(api, injected_env or {})

    def _volumes(self, api: httpx.Client, pvc_root: Path) -> dict[str, Path]:
        """mountPath → local folder for every volume mount (/dev/shm stays the host's)."""
        local: dict[str, Path] = {}
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                folder = pvc_root / volume["persistentVolumeClaim"]["claimName"]
            else:
                folder = self.root / "volumes" / name
            folder.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                config_map = _get(api, f"/api/v1/namespaces/{self.namespace}/configmaps/"
                                       f"{volume['configMap']['name']}")
                for key, value in (config_map.get("data") or {}).items():
                    (folder / key).write_text(value)
            local[name] = folder
        return {m["mountPath"]: local[m["name"]] for m in self.container.get("volumeMounts", [])
                if m["mountPath"] != "/dev/shm"}

    def _local_path(self, text: str) -> str:
        for mount in sorted(self.mounts, key=len, reverse=True):
            if text == mount or text.startswith(mount + "/"):
                return str(self.mounts[mount]) + text[len(mount):]
            if f"={mount}/" in text:
                return text.replace(f"={mount}/", f"={self.mounts[mount]}/")
        return text

    def _env(self, api: httpx.Client, injected: dict[str, str]) -> dict[str, str]:
        env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "HOME": str(self.root), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = self._local_path(expand(item["value"], env))
            elif ref := item.get("valueFrom", {}).get("secretKeyRef"):
                secret = _get(api, f"/api/v1/namespaces/{self.namespace}/secrets/{ref['name']}")
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        env.update(injected)
        return env

    def argv(self) -> list[str]:
        """The command as the kubelet would run it: `$(VAR)` expanded, mounts and ports mapped locally."""
        words = [expand(word, self.env) for word in self.container.get("command", []) + self.container.get("args", [])]
        words = [self._local_path(word) for word in words]
        words = ["127.0.0.1" if word == "0.0.0.0" else word for word in words]
        return [str(self.ports.get(int(word), word)) if word.isdigit() else word for word in words]

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv(), cwd=self.root, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def probe(self, probe: dict[str, Any] | None) -> bool:
        """An httpGet probe against this pod's mapped port."""
        if probe is None or self.exit_code() is not None or self.process is None:
            return False
        get = probe["httpGet"]
        port = get["port"] if isinstance(get["port"], int) else self.port_names[get["port"]]
        try:
            return httpx.get(f"http://127.0.0.1:{self.ports[port]}{get['path']}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def url(self, port_name: str) -> str:
        return f"http://127.0.0.1:{self.ports[self.port_names[port_name]]}"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `grace` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def _get(api: httpx.Client, path: str) -> dict[str, Any]:
    response = api.get(path)
    response.raise_for_status()
    return response.json()
