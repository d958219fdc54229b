"""Run the `ClusterEmulator` on 127.0.0.1 in a background thread, for synchronous tests and subprocesses."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kmock import Server
from kube_emulator import ClusterEmulator

T = TypeVar("T")


class EmulatedCluster:
    """An API server at `url`; `call(fn)` runs `fn(emulator)` on the server's loop (safe reads and setup)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.emulator: ClusterEmulator | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._main, name="kube-emulator", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ClusterEmulator() as emulator, Server(emulator, host="127.0.0.1", port=None) as server:
            self.emulator = emulator
            self.url = f"http://127.0.0.1:{server.port}"
            self._ready.set()
            await self._stop.wait()

    def start(self) -> EmulatedCluster:
        self._thread.start()
        if not self._ready.wait(timeout=30) or self._failure is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._failure!r}")
        return self

    def stop(self) -> None:
        if self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def call(self, fn: Callable[[ClusterEmulator], T], timeout: float = 30) -> T:
        """Run `fn(emulator)` on the emulator's event loop and return its result."""

        async def run() -> T:
            return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def live(self, res: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Current objects of a resource (`'kubeflow.org/v1/pytorchjobs'`, `'v1/services'`)."""
        return self.call(lambda emulator: emulator.live(res, namespace))

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig pointing at this server (no credentials: the emulator does not authenticate)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator"}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path
