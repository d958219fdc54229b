"""The server for real: uvicorn on 127.0.0.1, called with the official `openai` client and with httpx; a tiny
model fine-tuned by the tests answers, concurrent requests are batched without changing greedy answers."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from glmtune_inference.chat import ChatModel


@pytest.fixture(scope="module", params=["v1", "v2"])
def glm(request, exports, served, server_factory):
    """A server for the fine-tuned model of one family, served under the name "glm"."""
    models = served(exports.get("full", request.param), name="glm")
    with server_factory(models, max_prompt_tokens=200, max_tokens_limit=64) as running:
        yield running


@pytest.fixture(scope="module")
def qa(trained_qa):
    return trained_qa["full"]


def client(running, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                         timeout=30, **kwargs)


def test_openai_client_gets_the_trained_answer(glm, qa):
    query, answer = qa[0]
    reply = client(glm).chat.completions.create(model="glm", messages=[{"role": "user", "content": query}],
                                                temperature=0)
    assert reply.choices[0].message.content == answer
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_streams_the_trained_answer(glm, qa):
    query, answer = qa[1]
    stream = client(glm).chat.completions.create(
        model="glm", messages=[{"role": "user", "content": query}], temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 1


def test_max_tokens_cuts_with_finish_reason_length(glm, qa):
    reply = client(glm).chat.completions.create(model="glm", messages=[{"role": "user", "content": qa[0][0]}],
                                                temperature=0, max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 2


def test_stop_sequence_from_the_request(glm, qa):
    query, answer = qa[0]
    reply = client(glm).chat.completions.create(model="glm", messages=[{"role": "user", "content": query}],
                                                temperature=0, stop=[answer[3:5]])
    assert reply.choices[0].message.content == answer[:3]
    assert reply.choices[0].finish_reason == "stop"


def test_seed_endpoint_answers_with_history(glm, qa):
    query, answer = qa[0]
    body = {"prompt": query, "history": [], "max_length": 128, "top_p": 0.7, "temperature": 0}
    reply = httpx.post(f"{glm.url}/", json=body, timeout=30)
    assert reply.status_code == 200
    data = reply.json()
    assert data["response"] == answer and data["status"] == 200
    assert data["history"] == [[query, answer]]
    assert len(data["time"]) == len("2024-01-01 00:00:00")


def test_concurrent_greedy_requests_are_batched_and_unchanged(glm, exports, served, qa):
    """Six clients at once: the answers equal one-at-a-time chat(), and decode steps ran with batch > 1."""
    model = ChatModel(next(iter(served(exports.get("full", glm.engine.models["glm"].family), name="glm")
                                .values())))
    queries = [q for q, _ in qa] + ["你好呀", "什么是机器学习？", "Hello!", "请介绍一下你自己。"]
    expected = [model.chat(q, do_sample=False, max_new_tokens=24)[0] for q in queries]
    before = batch_histogram(glm.url)

    async def ask_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{glm.url}/v1", api_key="unused", max_retries=0) as api:
            replies = await asyncio.gather(*(api.chat.completions.create(
                model="glm", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24)
                for q in queries))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(ask_all()) == expected
    after = batch_histogram(glm.url)
    single_steps = after["1.0"] - before["1.0"]
    all_steps = after["+Inf"] - before["+Inf"]
    assert all_steps > single_steps, "no decode step ran with more than one request"


def batch_histogram(url: str) -> dict[str, float]:
    """Cumulative bucket counts of glmtune_batch_size from /metrics."""
    counts = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("glmtune_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
    return counts


def test_models_endpoint_lists_the_served_names(glm):
    assert [m.id for m in client(glm).models.list()] == ["glm"]


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 65}, "max_tokens"),
    ({"max_completion_tokens": 65}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "你好" * 400}]}, "messages"),
    ({"n": 17}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "messages[0].role"),
])
def test_out_of_bounds_requests_get_400_naming_the_field(glm, body, param):
    """OpenAI's own error shape: the official client raises BadRequestError with `param` set."""
    request = {"model": "glm", "messages": [{"role": "user", "content": "你好"}], **body}
    with pytest.raises(openai.BadRequestError) as caught:
        client(glm).chat.completions.create(**request)
    assert caught.value.status_code == 400
    assert caught.value.param == param, caught.value.body
    assert caught.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("name", ["nope", "/etc/passwd", "../../glm", "s3://bucket/model"])
def test_model_names_never_reach_the_filesystem(glm, name):
    reply = httpx.post(f"{glm.url}/v1/chat/completions", timeout=30,
                       json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 404
    assert reply.json()["error"]["param"] == "model"


def test_health_readiness_and_metrics(glm):
    assert httpx.get(f"{glm.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{glm.url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"] == ["glm"]
    text = httpx.get(f"{glm.url}/metrics").text
    for metric in ("glmtune_requests_total", "glmtune_queue_depth", "glmtune_completion_tokens_total",
                   "glmtune_time_to_first_token_seconds_bucket", "glmtune_request_duration_seconds_bucket"):
        assert metric in text
