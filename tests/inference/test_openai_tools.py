"""ChatGLM3 function calling through the OpenAI API, for real: a tiny v3 model memorises one tool call, its
answer to the tool's result and a plain answer; the official `openai` client sees `tool_calls` (streamed too),
sends the result back as a `tool` message, and a ChatGLM3 answer never shows its metadata line."""

from __future__ import annotations

import json

import openai
import pytest
from tool_cases import AFTER_RESULT, ARGUMENTS, CALL_QUERY, GREETING, RESULT, TOOLS, WEATHER

from glmtune.templates import (
    Message,
    encode_answer,
    encode_messages,
    encode_tool_call,
    tool_call_text,
    tools_system_text,
)


def samples(tok) -> list[tuple[list[int], list[int]]]:
    """The call, the answer to the tool's result, and the plain answer with and without tools offered."""
    offer = Message("system", tools_system_text([WEATHER]))
    call = Message("assistant", tool_call_text(ARGUMENTS), metadata="get_weather")
    return [
        (encode_messages(tok, "v3", [offer, Message("user", CALL_QUERY)]),
         encode_tool_call(tok, "v3", "get_weather", ARGUMENTS)),
        (encode_messages(tok, "v3", [offer, Message("user", CALL_QUERY), call, Message("observation", RESULT)]),
         encode_answer(tok, "v3", AFTER_RESULT)),
        (encode_messages(tok, "v3", [offer, Message("user", GREETING[0])]), encode_answer(tok, "v3", GREETING[1])),
        (encode_messages(tok, "v3", [Message("user", GREETING[0])]), encode_answer(tok, "v3", GREETING[1])),
    ]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, fine_tune, served, server_factory):
    """A server over a tiny ChatGLM3 model trained on a call, the answer to its result and plain answers."""
    out = fine_tune("v3", samples, tmp_path_factory.mktemp("v3-tools") / "full")
    with server_factory(served(out, name="glm3"), max_prompt_tokens=1000, max_tokens_limit=64) as running:
        yield running


def client(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(running, messages, **extra):
    return client(running).chat.completions.create(model="glm3", messages=messages, temperature=0, **extra)


def test_the_models_tool_call_comes_back_as_tool_calls(tool_model):
    reply = ask(tool_model, [{"role": "user", "content": CALL_QUERY}], tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGUMENTS


def test_a_streamed_tool_call_arrives_as_one_delta(tool_model):
    chunks = list(ask(tool_model, [{"role": "user", "content": CALL_QUERY}], tools=TOOLS, stream=True))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(calls) == 1
    assert calls[0][0].function.name == "get_weather"
    assert json.loads(calls[0][0].function.arguments) == ARGUMENTS
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_the_tool_result_goes_back_as_an_observation(tool_model):
    first = ask(tool_model, [{"role": "user", "content": CALL_QUERY}], tools=TOOLS).choices[0].message
    messages = [{"role": "user", "content": CALL_QUERY}, first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": RESULT}]
    reply = ask(tool_model, messages, tools=TOOLS)
    assert reply.choices[0].message.content == AFTER_RESULT
    assert reply.choices[0].finish_reason == "stop"


def test_a_named_tool_choice_opens_the_call_for_the_model(tool_model):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = ask(tool_model, [{"role": "user", "content": CALL_QUERY}], tools=TOOLS, tool_choice=choice)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGUMENTS


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_a_chatglm3_answer_shows_no_metadata_line(tool_model, tools):
    """ChatGLM3 starts every answer with a metadata line (empty for text): the client sees the text only,
    streamed or not."""
    extra = {"tools": tools} if tools else {}
    reply = ask(tool_model, [{"role": "user", "content": GREETING[0]}], **extra)
    assert reply.choices[0].message.content == GREETING[1]
    assert reply.choices[0].message.tool_calls is None
    chunks = list(ask(tool_model, [{"role": "user", "content": GREETING[0]}], stream=True, **extra))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == GREETING[1]


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
])
def test_tool_requests_the_model_cannot_follow_get_400_naming_the_field(tool_model, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(tool_model, [{"role": "user", "content": CALL_QUERY}], **extra)
    assert caught.value.param == param, caught.value.body


def test_tool_call_arguments_that_are_not_json_get_400(tool_model):
    messages = [{"role": "user", "content": CALL_QUERY},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                      "function": {"name": "get_weather", "arguments": "北京"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(tool_model, messages, tools=TOOLS)
    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_tools_on_chatglm_6b_and_chatglm2_get_400(exports, served, server_factory, family):
    models = served(exports.get("full", family), name="glm")
    with server_factory(models) as running:
        api = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=30)
        for extra, param in (({"tools": TOOLS}, "tools"),
                             ({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "tool", "tool_call_id": "c", "content": "{}"}]}, "messages")):
            request = {"model": "glm", "messages": [{"role": "user", "content": "hi"}], **extra}
            with pytest.raises(openai.BadRequestError) as caught:
                api.chat.completions.create(**request)
            assert caught.value.param == param
            assert "ChatGLM3" in caught.value.body["message"]
