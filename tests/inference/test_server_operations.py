"""Operating the server: adapters by model name, API key, a bounded queue (429 + Retry-After), client
disconnects and timeouts stopping generation, JSON access logs without prompts, draining on shutdown."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import httpx
import openai
import pytest
import torch

LONG = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 3000}


class SlowForward(torch.nn.Module):
    """The tiny GLM with 10 ms added per forward, so a request is still running when the test looks."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, *args, **kwargs):
        time.sleep(0.01)
        return self.inner(*args, **kwargs)

    def decode_position_ids(self, *args):
        return self.inner.decode_position_ids(*args)


@pytest.fixture(scope="module")
def base_v2(exports, served):
    """The untrained base (it never says eos, so requests run as long as max_tokens allows), slowed down."""
    (model,) = served(exports.get("base", "v2"), name="base").values()
    return {"base": dataclasses.replace(model, model=SlowForward(model.model))}


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_adapters_are_chosen_per_request_by_model_name(exports, served, server_factory, trained_qa):
    models = served(exports.get("base", "v2"), {"lora": exports.get("adapter", "v2"),
                                                "ptv2": exports.get("prefix", "v2")}, name="glm")
    with server_factory(models) as running:
        api = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        for name, kind in (("lora", "adapter"), ("ptv2", "prefix")):
            query, answer = trained_qa[kind][0]
            reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": query}],
                                                temperature=0)
            assert reply.choices[0].message.content == answer
            assert reply.model == name
        assert [m.id for m in api.models.list()] == ["glm", "lora", "ptv2"]


def test_api_key_is_required_when_configured(base_v2, server_factory):
    with server_factory(base_v2, api_key="s3cret") as running:
        body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{running.url}/v1/chat/completions", json=body).status_code == 401
        wrong = httpx.post(f"{running.url}/", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        api = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert api.chat.completions.create(**body).choices[0].finish_reason == "length"
        assert httpx.get(f"{running.url}/healthz").status_code == 200


def test_full_queue_answers_429_with_retry_after_and_disconnect_cancels(base_v2, server_factory):
    with server_factory(base_v2, max_batch=1, queue_size=1, max_tokens_limit=3000) as running:
        engine = running.engine
        with httpx.Client(base_url=running.url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json={"model": "base", "stream": True, **LONG}) as first:
                first_lines = first.iter_lines()  # keep the iterator: dropping it closes the connection
                next(first_lines)
                wait_for(lambda: engine.running == 1)
                with httpx.Client(base_url=running.url, timeout=30) as other:
                    body = {"model": "base", "stream": True, **LONG}
                    with other.stream("POST", "/v1/chat/completions", json=body) as second:
                        wait_for(lambda: engine.queue_depth == 1)
                        busy = http.post("/v1/chat/completions", json={"model": "base", **LONG})
                        assert busy.status_code == 429
                        assert busy.headers["retry-after"] == "1"
                        assert second.status_code == 200 and next(first_lines) is not None
                # both clients went away: their generations stop instead of running to max_tokens
            cancelled = 'glmtune_generations_total{model="base",reason="cancelled"} 2.0'
            wait_for(lambda: cancelled in http.get("/metrics").text)
            assert engine.running == 0 and engine.queue_depth == 0


def test_request_timeout_answers_504(base_v2, server_factory):
    with server_factory(base_v2, request_timeout_s=0.3, max_tokens_limit=3000) as running:
        reply = httpx.post(f"{running.url}/v1/chat/completions", json={"model": "base", **LONG}, timeout=30)
        assert reply.status_code == 504
        assert reply.json()["error"]["type"] == "timeout"
        wait_for(lambda: running.engine.running == 0)


def test_access_log_is_json_without_prompts(base_v2, server_factory, caplog):
    secret = "my private question"
    with caplog.at_level(logging.INFO, logger="glmtune.access"), server_factory(base_v2) as running:
        httpx.post(f"{running.url}/v1/chat/completions", timeout=30,
                   json={"model": "base", "messages": [{"role": "user", "content": secret}], "max_tokens": 2})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmtune.access"]
    line = next(x for x in lines if x["path"] == "/v1/chat/completions")
    assert line["status"] == 200 and line["model"] == "base" and line["completion_tokens"] == 2
    assert line["finish_reason"] == "length" and line["duration_ms"] > 0
    assert secret not in json.dumps(lines)


def test_shutdown_lets_an_open_stream_finish(base_v2, server_factory):
    with server_factory(base_v2, max_tokens_limit=3000) as running:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            body = {"model": "base", "stream": True, **LONG, "max_tokens": 200}
            with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                running.server.should_exit = True
                rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    assert not running.engine.accepting
