"""GLM-4 function calling through the OpenAI API, for real: a tiny GLM-4 model memorises a tool call in GLM-4's
format (``<|assistant|>name\\n{JSON}<|observation|>``), its answer to the tool's result and a plain answer; the
`openai` client sees `tool_calls`, sends the result back as a `tool` message, and never sees the metadata line."""

from __future__ import annotations

import json

import openai
import pytest
from tool_cases import AFTER_RESULT, ARGUMENTS, CALL_QUERY, GREETING, RESULT, TOOLS, WEATHER

from glmtune.templates import Message, encode_answer, encode_messages, encode_tool_call


def samples(tok) -> list[tuple[list[int], list[int]]]:
    """The call, the answer to the tool's result, and the plain answer with and without tools offered, each
    encoded as the OpenAI server encodes the request (tools offered through `encode_messages`)."""
    call = Message("assistant", json.dumps(ARGUMENTS, ensure_ascii=False), metadata="get_weather")
    return [
        (encode_messages(tok, "glm4", [Message("user", CALL_QUERY)], tools=[WEATHER]),
         encode_tool_call(tok, "glm4", "get_weather", ARGUMENTS)),
        (encode_messages(tok, "glm4", [Message("user", CALL_QUERY), call, Message("observation", RESULT)],
                         tools=[WEATHER]),
         encode_answer(tok, "glm4", AFTER_RESULT)),
        (encode_messages(tok, "glm4", [Message("user", GREETING[0])], tools=[WEATHER]),
         encode_answer(tok, "glm4", GREETING[1])),
        (encode_messages(tok, "glm4", [Message("user", GREETING[0])]), encode_answer(tok, "glm4", GREETING[1])),
    ]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, fine_tune, served, server_factory):
    """A server over a tiny GLM-4 model trained on a call, the answer to its result and plain answers."""
    out = fine_tune("glm4", samples, tmp_path_factory.mktemp("glm4-tools") / "full", steps=100)
    with server_factory(served(out, name="glm4"), max_prompt_tokens=2000, max_tokens_limit=64) as running:
        yield running


def ask(running, messages, **extra):
    client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
    return client.chat.completions.create(model="glm4", messages=messages, temperature=0, **extra)


@pytest.mark.slow
def test_a_glm4_tool_call_comes_back_as_tool_calls_and_its_result_as_an_observation(tool_model):
    reply = ask(tool_model, [{"role": "user", "content": CALL_QUERY}], tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGUMENTS
    messages = [{"role": "user", "content": CALL_QUERY}, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    reply = ask(tool_model, messages, tools=TOOLS)
    assert reply.choices[0].message.content == AFTER_RESULT and reply.choices[0].finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_a_glm4_answer_shows_no_metadata_line(tool_model, tools):
    extra = {"tools": tools} if tools else {}
    reply = ask(tool_model, [{"role": "user", "content": GREETING[0]}], **extra)
    assert reply.choices[0].message.content == GREETING[1] and reply.choices[0].message.tool_calls is None
    chunks = list(ask(tool_model, [{"role": "user", "content": GREETING[0]}], stream=True, **extra))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GREETING[1]
