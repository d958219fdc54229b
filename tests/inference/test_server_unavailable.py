"""When the server answers 503, over real HTTP on 127.0.0.1: during the drain notice after SIGTERM (new work
refused with Retry-After, /readyz failing, open streams finishing) and when the model cannot generate (/readyz
fails so the pod leaves the Service). A full queue is 429 (tests/inference/test_server_operations.py)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

CHAT = {"model": "base", "messages": [{"role": "user", "content": "你好"}], "temperature": 0}


class Slowed(torch.nn.Module):
    """The tiny GLM with `delay` seconds added per forward, so a stream is still open when the test looks."""

    def __init__(self, inner: torch.nn.Module, delay: float) -> None:
        super().__init__()
        self.inner, self.config, self.delay = inner, inner.config, delay

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)

    def decode_position_ids(self, *args):
        return self.inner.decode_position_ids(*args)


class OutOfMemory(torch.nn.Module):
    """A model whose every forward fails as a GPU out of memory would."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def decode_position_ids(self, *args):
        return self.inner.decode_position_ids(*args)


@pytest.fixture(scope="module")
def base(exports, served):
    (model,) = served(exports.get("base", "v2"), name="base").values()
    return model


def test_during_the_drain_notice_new_requests_get_503_and_open_streams_finish(base, server_factory):
    models = {"base": dataclasses.replace(base, model=Slowed(base.model, 0.02))}
    with server_factory(models, drain_notice_s=30, max_tokens_limit=3000) as running:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            assert http.get("/readyz").status_code == 200
            with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 60}) as open_:
                lines = open_.iter_lines()
                assert next(lines).startswith("data: ")
                running.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
                ready = http.get("/readyz")
                refused = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
                rest = [line for line in lines if line]
            assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "server_unavailable"
            assert rest[-1] == "data: [DONE]" and '"finish_reason":"length"' in rest[-2]
            assert not running.server.should_exit, "the notice keeps the socket open"


def test_readiness_fails_with_503_when_the_model_cannot_generate(base, server_factory):
    with server_factory({"base": dataclasses.replace(base, model=OutOfMemory(base.model))}) as running:
        ready = httpx.get(f"{running.url}/readyz", timeout=30)
        assert ready.status_code == 503
        assert "test generation failed" in ready.json()["error"]["message"]
        assert httpx.get(f"{running.url}/healthz", timeout=30).status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_glmtune_serve_answers_503_after_sigterm_then_exits(exports, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read back after the process ends
    process = subprocess.Popen(
        [sys.executable, "-m", "glmtune_app.cli", "serve", str(exports.get("base", "v2")), "--model-name", "base",
         "--port", str(port), "--drain-notice", "3"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30).status_code == 200
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
        refused = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        process.wait(timeout=60)
        assert time.monotonic() - stopped >= 3, "the socket stayed open for the whole notice"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
