"""The README's quickstart, run exactly as written: it must end serving a model that learned the examples."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pipeline_testkit import QUICKSTART_DATA, free_port, readme_quickstart_command
from testkit import REPO_ROOT

READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 60.0


def _dialogues() -> list[list[dict[str, str]]]:
    lines = QUICKSTART_DATA.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["paragraph"] for line in lines if line.strip()]


def _wait_until_ready(process: subprocess.Popen, log: Path) -> str:
    """The base URL the run printed, once `/readyz` answers 200 there (bounded; fails if the run exits)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the quickstart exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        printed = re.search(r"on (http://127\.0\.0\.1:\d+) with the OpenAI API", log.read_text())
        if printed:
            try:
                if httpx.get(f"{printed.group(1)}/readyz", timeout=10).status_code == 200:
                    return printed.group(1)
            except httpx.TransportError:
                pass
        time.sleep(1.0)
    pytest.fail(f"no ready server within {READY_TIMEOUT_S:.0f}s:\n{log.read_text()[-4000:]}")


def _ask(url: str, messages: list[dict[str, str]]) -> str:
    body = {"model": "quickstart", "messages": messages, "temperature": 0, "max_tokens": 128}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_readme_quickstart_serves_the_trained_answers(tmp_path: Path) -> None:
    command = readme_quickstart_command()
    assert command == "./scripts/quickstart.sh"
    port = free_port()
    workdir = tmp_path / "run"
    env = {**os.environ, "GLMTUNE_WORKDIR": str(workdir), "GLMTUNE_PORT": str(port)}
    log = tmp_path / "quickstart.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(["bash", "-c", command], cwd=REPO_ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = _wait_until_ready(process, log)
        assert url == f"http://127.0.0.1:{port}"
        assert f"chat {workdir / 'export'}" in log.read_text()
        single = next(d for d in _dialogues() if len(d) == 1)[0]
        assert _ask(url, [{"role": "user", "content": single["q"]}]) == single["a"]
        first, second = next(d for d in _dialogues() if len(d) >= 2)[:2]
        history = [{"role": "user", "content": first["q"]}, {"role": "assistant", "content": first["a"]}]
        assert _ask(url, [*history, {"role": "user", "content": second["q"]}]) == second["a"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Stopped like Ctrl-C in a terminal: the server drains and the command exits 130 on its own (no SIGKILL).
    assert process.returncode == 130, log.read_text()[-4000:]
