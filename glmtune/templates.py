"""Chat templates: the ONE place prompts are built, for training and inference alike (torch-free).

  * ``v1`` (ChatGLM-6B): no history -> the bare query; else ``[Round i]\\n问：{q}\\n答：{a}\\n`` per past turn
    (i from 0) then ``[Round n]\\n问：{query}\\n答：``. Ids: prompt text + ``[gMASK] <sop>``.
  * ``v2`` (ChatGLM2-6B): ``[Round i]\\n\\n问：{q}\\n\\n答：{a}\\n\\n`` per past turn (i from 1) then
    ``[Round n]\\n\\n问：{query}\\n\\n答：``, also without history. Ids: ``[gMASK] sop`` + prompt text.
  * ``v3`` (ChatGLM3-6B, its ``build_chat_input``): ``[gMASK] sop``, then per message ``<|role|>`` + metadata
    (always empty here) + ``"\\n"`` + content, each part tokenized on its own; ``<|assistant|>`` opens the
    answer. Rendered as text this is ``<|role|>\\n {content}`` (ChatGLM3's own chat_template: the space
    stands for the dummy prefix SentencePiece puts before each separately encoded content).
  * ``glm4`` (GLM-4, glm-4-9b-chat's own ``chat_template``, `GLM4_CHAT_TEMPLATE`): ``[gMASK]<sop>`` then per
    message ``<|role|>{metadata}\\n{content}``, the text after the role token encoded in ONE piece (ids equal the
    published tokenizer's on the rendered text); messages with empty content are left out; ``<|assistant|>``
    opens the answer, which the model writes as ``\\n{answer}`` and ends with ``<|endoftext|>``.

v1 and v2 have no system role: a system text goes first, as its own paragraph (``{system}\\n`` for v1,
``{system}\\n\\n`` for v2). The answer the model learns ends with the end token (v1 ``<eop>``, v2/v3 ``</s>``,
glm4 ``<|endoftext|>``).

Function calling (v3 and glm4, `encode_messages` with `tools`): the tools go into a system message after the
model's own preamble (v3: the list as indented JSON; glm4: per function ``\\n## {name}\\n\\n{JSON}`` + its
suffix, rendered as transformers' ``trim_blocks`` does). The model answers a call as ``<|assistant|>{tool
name}\\n`` + the arguments (v3: a ```` ```python tool_call(k=v, ...)``` ```` block; glm4: a JSON object, see
`tool_call_text`) and ends it with ``<|observation|>``; the tool's result comes back as an ``<|observation|>``
message. `read_tool_call` reads such an answer back (never by eval). In both, role names typed inside content
stay text (no role injection from data).
The tokenizer is used through its public API only (`encode`, `get_command`, `eos_token_id`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glmtune.errors import InvalidInputError

TEMPLATES = ("v1", "v2", "v3", "glm4")
# templates whose messages start with a role token and a metadata line (tools, observations)
ROLE_TEMPLATES = ("v3", "glm4")
# ChatGLM-6B's chat() restores full-width punctuation next to CJK text (its tokenizer normalises NFKC)
_V1_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
_CJK = "[\u4e00-\u9fff]"


def template_for_family(family: str) -> str:
    """The chat template a model family was trained with (each family has its own)."""
    if family not in TEMPLATES:
        raise InvalidInputError(f"unknown model family {family!r}; expected one of {', '.join(TEMPLATES)}")
    return family


def _check(template: str) -> None:
    if template not in TEMPLATES:
        raise InvalidInputError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}",
                                where="template")


def _role_content(template: str, text: str) -> str:
    """Metadata-free header end plus content, as text: v3 ``"\\n " + content`` (``"\\n"`` when empty), glm4
    ``"\\n" + content``."""
    return "\n" + text if template == "glm4" else _v3_content(text)


def _v3_content(text: str) -> str:
    """Metadata-free header end plus content, as text: ``"\\n " + content`` (``"\\n"`` when empty)."""
    return "\n " + text if text else "\n"


def render_prompt(template: str, query: str, history: Sequence[tuple[str, str]] = (),
                  system: str | None = None) -> str:
    """The prompt text for `query` after the past turns `history` ((question, answer) pairs)."""
    _check(template)
    if template == "v1":
        if not history:
            text = query
        else:
            past = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            text = f"{past}[Round {len(history)}]\n问：{query}\n答："
        return f"{system}\n{text}" if system else text
    if template == "v2":
        past = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1))
        text = f"{past}[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return f"{system}\n\n{text}" if system else text
    # v3 and glm4 (after the [gMASK]<sop> prefix, which is not text in either)
    parts = [f"<|system|>{_role_content(template, system)}"] if system else []
    parts += [f"<|user|>{_role_content(template, q)}<|assistant|>{_role_content(template, a)}" for q, a in history]
    parts.append(f"<|user|>{_role_content(template, query)}<|assistant|>")
    return "".join(parts)


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's ids in three parts, so data strategies can cut the body and keep the rest."""

    prefix_ids: list[int]  # special tokens before the text   (v1: []; v2/v3/glm4: [gMASK, sop])
    body_ids: list[int]  # prompt text tokens (history + query; v3/glm4 role tokens) — the part strategies may cut
    suffix_ids: list[int]  # tokens that open the answer (v1: [gMASK, <sop>]; v2: []; v3/glm4: [<|assistant|>])

    @property
    def ids(self) -> list[int]:
        """prefix + body + suffix: exactly what inference feeds to generate()."""
        return self.prefix_ids + self.body_ids + self.suffix_ids


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _split_ids(tokenizer: Any, text: str) -> list[int]:
    # split_special_tokens: a role name inside content is text, never a role switch
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else []


def _message(tokenizer: Any, template: str, role: str, content: str, metadata: str = "") -> list[int]:
    """A role message's ids: v3 encodes the header and the content apart (as ChatGLM3's build_chat_input), glm4
    the text after the role token in one piece (as the published tokenizer encodes the rendered template)."""
    if template == "glm4":
        return [tokenizer.get_command(f"<|{role}|>")] + _split_ids(tokenizer, f"{metadata}\n{content}")
    return _v3_message(tokenizer, role, content, metadata)


def _v3_message(tokenizer: Any, role: str, content: str, metadata: str = "") -> list[int]:
    # role tokens typed inside content stay text, as in ChatGLM3 (no role injection from data)
    content_ids = tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True) if content else []
    header = tokenizer.encode(f"{metadata}\n", add_special_tokens=False, split_special_tokens=True)
    return [tokenizer.get_command(f"<|{role}|>")] + list(header) + list(content_ids)


def encode_prompt(tokenizer: Any, template: str, query: str, history: Sequence[tuple[str, str]] = (),
                  system: str | None = None) -> EncodedPrompt:
    """The ids of `render_prompt(...)` with the family's special tokens, split into prefix/body/suffix."""
    _check(template)
    gmask_sop = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    if template in ("v1", "v2"):
        body = _text_ids(tokenizer, render_prompt(template, query, history, system))
        return EncodedPrompt([], body, gmask_sop) if template == "v1" else EncodedPrompt(gmask_sop, body, [])
    body = _message(tokenizer, template, "system", system) if system else []
    for question, answer in history:
        body += _message(tokenizer, template, "user", question) + _message(tokenizer, template, "assistant", answer)
    body += _message(tokenizer, template, "user", query)
    return EncodedPrompt(gmask_sop, body, [tokenizer.get_command("<|assistant|>")])


def encode_answer(tokenizer: Any, template: str, answer: str) -> list[int]:
    """The tokens the model learns to produce after the prompt: the answer plus the end token."""
    _check(template)
    if template in ROLE_TEMPLATES:
        # after <|assistant|> the model writes the (empty) metadata line, then the content
        return _message(tokenizer, template, "assistant", answer)[1:] + [tokenizer.eos_token_id]
    return _text_ids(tokenizer, answer) + [tokenizer.eos_token_id]


def answer_window_prefix(tokenizer: Any, template: str) -> list[int]:
    """What starts a continuation window of a long answer: ``[gMASK, sop]`` (v3/glm4 add ``<|assistant|>``)."""
    _check(template)
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    return prefix + [tokenizer.get_command("<|assistant|>")] if template in ROLE_TEMPLATES else prefix


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end generation: the end token, and for v3/glm4 also ``<|user|>`` and ``<|observation|>``
    (GLM-4's config lists the same three as its eos ids)."""
    _check(template)
    stops = [tokenizer.eos_token_id]
    if template in ROLE_TEMPLATES:
        stops += [tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    return stops


def decode_answer(tokenizer: Any, template: str, ids: Sequence[int]) -> str:
    """The answer text in generated `ids` (up to the first stop token), as the original chat() shows it:
    stripped; v3/glm4 without their metadata line; v1 with full-width punctuation next to CJK characters."""
    _check(template)
    stops = set(stop_token_ids(tokenizer, template))
    ids = list(ids)
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    if template in ROLE_TEMPLATES and "\n" in text:
        text = text.split("\n", 1)[1]
    text = text.strip()
    if template == "v1":
        for ascii_mark, full_width in _V1_PUNCTUATION:
            mark = re.escape(ascii_mark)
            text = re.sub(f"({_CJK}){mark}", rf"\1{full_width}", text)
            text = re.sub(f"{mark}({_CJK})", rf"{full_width}\1", text)
    return text


ROLES = ("system", "user", "assistant", "observation")
V3_ROLES = ROLES
TOOLS_PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_TOOLS_PREAMBLE = ("你是一个名为 GLM-4 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                       "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
# glm-4-9b-chat's chat_template with its function-tool branch (the built-in python/browser/cogview tools left
# out): written into tokenizer_config.json so transformers' and vLLM's apply_chat_template give our ids.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n" + GLM4_TOOLS_PREAMBLE
    + "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}" + GLM4_TOOL_SUFFIX
    + "{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class Message:
    """One v3/glm4 message; `metadata` is the tool name of an assistant message that calls a tool."""

    role: str
    content: str
    metadata: str = ""


def _check_tools(template: str) -> None:
    if template not in ROLE_TEMPLATES:
        raise InvalidInputError(f"message lists with tools and tool results need the v3 (ChatGLM3) or glm4 "
                                f"(GLM-4) template, not {template!r}", where="template")


def _function(tool: Mapping[str, Any], index: int) -> Mapping[str, Any]:
    """The function of an OpenAI-style tool ({"type": "function", "function": {...}}) or a bare function."""
    if tool.get("type", "function") != "function":
        raise InvalidInputError(f"only function tools are supported, got {tool.get('type')!r}",
                                where=f"tools[{index}].type")
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise InvalidInputError("a tool needs a function with a non-empty name", where=f"tools[{index}]")
    return function


def tools_system_text(tools: Sequence[Mapping[str, Any]], template: str = "v3") -> str:
    """The system message that offers `tools` (name, description, parameters): v3 as ChatGLM3's own demo writes
    it, glm4 as GLM-4's published chat template renders it (one newline before each ``##``: transformers and vLLM
    render with ``trim_blocks``, which eats the template's first)."""
    _check_tools(template)
    if template == "v3":
        return f"{TOOLS_PREAMBLE}\n{json.dumps(list(tools), indent=4, ensure_ascii=False)}"
    text = GLM4_TOOLS_PREAMBLE
    for index, tool in enumerate(tools):
        function = _function(tool, index)
        text += f"\n## {function['name']}\n\n{json.dumps(function, indent=4, ensure_ascii=False)}{GLM4_TOOL_SUFFIX}"
    return text


def tool_call_text(arguments: Mapping[str, Any], template: str = "v3") -> str:
    """A call's content (after its tool-name line): v3 a python block ``tool_call(k=v, ...)`` (values as Python
    literals), glm4 the arguments as a JSON object."""
    _check_tools(template)
    if template == "glm4":
        return json.dumps(dict(arguments), ensure_ascii=False)
    args = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"```python\ntool_call({args})\n```"


def _check_role(message: Message, index: int) -> None:
    if message.role not in ROLES:
        raise InvalidInputError(f"role must be one of {', '.join(ROLES)}, got {message.role!r}",
                                where=f"messages[{index}].role")


def glm4_render_messages(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] = (),
                         add_generation_prompt: bool = True) -> str:
    """A GLM-4 conversation as its published chat template renders it, ``[gMASK]<sop>`` included (the text
    `encode_messages(..., "glm4", ...)` gives the ids of)."""
    text = "[gMASK]<sop>"
    if tools:
        text += f"<|system|>\n{tools_system_text(tools, 'glm4')}"
    for index, message in enumerate(messages):
        _check_role(message, index)
        if message.content:
            text += f"<|{message.role}|>{message.metadata}\n{message.content}"
    return text + ("<|assistant|>" if add_generation_prompt else "")


def encode_messages(tokenizer: Any, template: str, messages: Sequence[Message], answer_metadata: str = "",
                    tools: Sequence[Mapping[str, Any]] = ()) -> list[int]:
    """Prompt ids of a v3/glm4 conversation (any order of system/user/assistant/observation messages), `tools`
    offered first in a system message, ending with ``<|assistant|>``; `answer_metadata` (a tool name) plus its
    newline is written after it, so the model continues with that tool's arguments."""
    _check_tools(template)
    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    if tools:
        ids += _message(tokenizer, template, "system", tools_system_text(tools, template))
    for index, message in enumerate(messages):
        _check_role(message, index)
        if message.content or template == "v3":  # GLM-4's template leaves empty messages out
            ids += _message(tokenizer, template, message.role, message.content, message.metadata)
    ids.append(tokenizer.get_command("<|assistant|>"))
    if answer_metadata:
        ids += _split_ids(tokenizer, f"{answer_metadata}\n")
    return ids


def encode_tool_call(tokenizer: Any, template: str, name: str, arguments: Mapping[str, Any]) -> list[int]:
    """The tokens a v3/glm4 model writes for a call after ``<|assistant|>``: the tool's name line, the
    arguments (`tool_call_text`), then ``<|observation|>`` (what a model learns to call tools with)."""
    _check_tools(template)
    message = _message(tokenizer, template, "assistant", tool_call_text(arguments, template), metadata=name)
    return message[1:] + [tokenizer.get_command("<|observation|>")]


def encode_raw(tokenizer: Any, template: str, text: str) -> list[int]:
    """Ids of a raw prompt (no chat turns) with the family's generation tokens: v1 ``text [gMASK] <sop>``, v2/v3
    ``[gMASK] sop text``, as the original tokenizers add them."""
    _check(template)
    gmask_sop = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    body = _text_ids(tokenizer, text) if text else []
    return body + gmask_sop if template == "v1" else gmask_sop + body


@dataclass(frozen=True)
class ToolCall:
    """A tool call read from a v3/glm4 answer: the tool's name and its arguments as a JSON text."""

    name: str
    arguments: str


def split_v3_answer(text: str) -> tuple[str, str] | None:
    """(metadata, content) of a decoded v3/glm4 answer, content without its leading whitespace; None while
    the metadata line is not complete (streaming)."""
    if "\n" not in text:
        return None
    metadata, content = text.split("\n", 1)
    return metadata.strip(), content.lstrip()


def parse_tool_call(name: str, content: str) -> ToolCall:
    """The call a v3/glm4 answer with metadata `name` makes: ```` ```python tool_call(k=v)``` ```` (ChatGLM3's;
    keyword arguments, Python literals only) or a JSON object (GLM-4's) become JSON arguments; anything else is passed on as the
    arguments text, as OpenAI does with arguments a model got wrong."""
    body = content.strip()
    fenced = re.fullmatch(r"```(?:python|json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    arguments = _literal_call(body)
    if arguments is None:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        arguments = parsed if isinstance(parsed, dict) else None
    text = body if arguments is None else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(name=name, arguments=text)


def read_tool_call(text: str) -> ToolCall | None:
    """The call in a whole decoded v3/glm4 answer (``name\n{arguments}``); None for a plain answer (an empty
    metadata line) or one whose metadata line is not complete."""
    parts = split_v3_answer(text)
    if parts is None or not parts[0]:
        return None
    return parse_tool_call(*parts)


def _literal_call(code: str) -> dict[str, Any] | None:
    """The keyword arguments of ``tool_call(k=<literal>, ...)``; None for anything else (never evaluated)."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"
            and not call.args and all(k.arg is not None for k in call.keywords)):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, SyntaxError, TypeError):
        return None
