"""OpenAI requests turned into what the engine runs: prompt ids (through the shared chat templates, ChatGLM3's
and GLM-4's tools and tool results included) and one set of generation parameters per choice, every value a client can get
wrong answered with an error naming its field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from glmtune.templates import ROLE_TEMPLATES, Message, encode_messages, encode_raw, tool_call_text
from glmtune_inference.api_schema import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from glmtune_inference.app_state import check_prompt, field_error, make_params, state
from glmtune_inference.generation import GenerationParams
from glmtune_inference.loading import ServedModel

_SEED_RANGE = 2**63


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request's prompt ids and how to read the answer: ChatGLM3 and GLM-4 answers (`v3`: a role template)
    start with a metadata line (a tool's name when the answer is a call); `forced_tool` is a call the prompt
    already opened."""

    ids: list[int]
    v3: bool
    tools: bool = False
    forced_tool: str | None = None


def chat_prompt(request: Request, served: ServedModel, body: ChatCompletionRequest) -> ChatPrompt:
    """Prompt ids of a chat request through the model's own template (tools only for ChatGLM3 and GLM-4)."""
    wants_tools = bool(body.tools) or body.tool_choice is not None or any(
        m.role == "tool" or m.tool_calls for m in body.messages)
    if served.template not in ROLE_TEMPLATES:
        if wants_tools:
            where = "tools" if body.tools else "tool_choice" if body.tool_choice is not None else "messages"
            raise field_error(("body", where), f"tools and tool messages need a ChatGLM3 (v3) or GLM-4 (glm4) "
                                               f"model; {served.name!r} uses the {served.template} template")
        query, history, system = conversation(body.messages)
        ids = _encoded(lambda: served.encode(query, history, system))
        return ChatPrompt(check_prompt(request, served, ids, ("body", "messages")), v3=False)
    forced = _forced_tool(body)
    offered = bool(body.tools) and body.tool_choice != "none"
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools or []] if offered else []
    messages = role_messages(body.messages, served.template)
    ids = _encoded(lambda: encode_messages(served.tokenizer, served.template, messages, forced or "", tools=tools))
    return ChatPrompt(check_prompt(request, served, ids, ("body", "messages")), v3=True, tools=offered,
                      forced_tool=forced)


def _forced_tool(body: ChatCompletionRequest) -> str | None:
    """The tool a request's tool_choice names (its name opens the answer), None for auto/none."""
    choice = body.tool_choice
    if choice is not None and not body.tools:
        raise field_error(("body", "tool_choice"), "needs tools")
    if choice == "required":
        raise field_error(("body", "tool_choice"), "ChatGLM3 and GLM-4 cannot be made to call some tool of its choosing: "
                                                   "name the tool ({\"type\": \"function\", \"function\": {\"name\": "
                                                   "...}}) or use \"auto\"")
    if choice is None or isinstance(choice, str):
        return None
    names = [t.function.name for t in body.tools or []]
    if choice.function.name not in names:
        raise field_error(("body", "tool_choice", "function", "name"),
                          f"{choice.function.name!r} is not among the tools ({', '.join(names)})")
    return choice.function.name


def role_messages(messages: Sequence[ChatMessage], template: str) -> list[Message]:
    """OpenAI messages as ChatGLM3's or GLM-4's: tool results become observations, an assistant's tool calls its
    metadata (the tool's name) and the arguments in the template's form (a ``tool_call(...)`` block for v3, JSON
    for glm4). The last message must be the user's or a tool result."""
    converted = []
    for index, message in enumerate(messages):
        if message.role == "tool":
            converted.append(Message("observation", message.content or ""))
        elif message.role == "assistant" and message.tool_calls:
            if message.content:
                converted.append(Message("assistant", message.content))
            for number, call in enumerate(message.tool_calls):
                loc = ("body", "messages", index, "tool_calls", number, "function", "arguments")
                converted.append(Message("assistant", tool_call_text(_arguments(call.function.arguments, loc), template),
                                         metadata=call.function.name))
        else:
            converted.append(Message(message.role, message.content or ""))
    if messages[-1].role not in ("user", "tool"):
        raise field_error(("body", "messages", len(messages) - 1, "role"),
                          "the last message must be the user's or a tool result")
    return converted


def _arguments(text: str, loc: tuple) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise field_error(loc, "must be a JSON object") from None
    if not isinstance(value, dict):
        raise field_error(loc, "must be a JSON object")
    return value


def conversation(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str]], str | None]:
    """(query, history pairs, system) from OpenAI messages for ChatGLM-6B/ChatGLM2: system first, then user and
    assistant turns alternating, user last."""
    system_parts = []
    index = 0
    while index < len(messages) and messages[index].role == "system":
        system_parts.append(messages[index].content or "")
        index += 1
    turns = messages[index:]
    for offset, message in enumerate(turns):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message.role != expected:
            raise field_error(("body", "messages", index + offset, "role"),
                              f"expected {expected!r}: after optional system messages, user and assistant "
                              "alternate, starting and ending with user")
    if not turns or len(turns) % 2 == 0:
        raise field_error(("body", "messages"), "the last message must be a user message")
    history = [(turns[i].content or "", turns[i + 1].content or "") for i in range(0, len(turns) - 1, 2)]
    return turns[-1].content or "", history, "\n".join(system_parts) or None


def completion_prompts(request: Request, served: ServedModel, body: CompletionRequest) -> list[list[int]]:
    """Ids of each raw prompt of a completions request (the family's generation tokens added, no template)."""
    if body.suffix:
        raise field_error(("body", "suffix"), "ChatGLM models do not fill in text before a suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise field_error(("body", "best_of"), "must equal n: this server does not rank extra candidates")
    if body.echo and body.logprobs is not None:
        raise field_error(("body", "echo"), "echo with logprobs would need the prompt's log-probabilities, which "
                                            "this server does not compute")
    prompts = body.prompts()
    ids = []
    for number, text in enumerate(prompts):
        loc = ("body", "prompt") if isinstance(body.prompt, str) else ("body", "prompt", number)
        encoded = _encoded(lambda t=text: encode_raw(served.tokenizer, served.template, t), loc)
        ids.append(check_prompt(request, served, encoded, loc))
    return ids


def _encoded(encode: Callable[[], list[int]], loc: Sequence[str | int] = ("body", "messages")) -> list[int]:
    """`encode()`, a text a tokenizer cannot take (lone surrogates) answered as an error naming `loc`."""
    try:
        return encode()
    except UnicodeError:
        raise field_error(loc, "text is not valid Unicode") from None


def choice_params(request: Request, served: ServedModel, body: SamplingFields, prompts: int,
                  max_tokens: int | None, logprobs: int | None) -> list[GenerationParams]:
    """Generation parameters for every choice (prompt-major: `n` per prompt); with a seed, choice i draws from
    seed + i, so the same request gives the same samples and its choices still differ."""
    settings = state(request).settings
    choices = prompts * body.n
    if choices > state(request).engine.queue_size:
        raise field_error(("body", "n"), f"{choices} choices exceed this server's queue of "
                                         f"{state(request).engine.queue_size}")
    limit = settings.max_tokens_limit
    tokens = max_tokens or min(settings.default_max_tokens, limit)
    if tokens > limit:
        name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise field_error(("body", name), f"at most {limit} on this server")
    options: dict[str, Any] = {"max_new_tokens": tokens, "stop": body.stop_sequences(), "logprobs": logprobs,
                               "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty}
    if body.temperature is not None:
        options.update(temperature=body.temperature, do_sample=body.temperature > 0)
    for key in ("top_p", "top_k", "repetition_penalty"):
        if getattr(body, key) is not None:
            options[key] = getattr(body, key)
    params = []
    for index in range(choices):
        seed = None if body.seed is None else (body.seed + index % body.n) % _SEED_RANGE
        params.append(make_params(served, **options, seed=seed))
    return params


def requested_logprobs(body: ChatCompletionRequest) -> int | None:
    """How many alternatives per token a chat request wants (None: no log-probabilities)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise field_error(("body", "top_logprobs"), "needs logprobs: true")
    return (body.top_logprobs or 0) if body.logprobs else None
