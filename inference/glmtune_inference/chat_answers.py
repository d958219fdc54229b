"""What generated text and log-probabilities become in OpenAI answers: ChatGLM3's and GLM-4's metadata line
taken off (and, when tools were offered, a tool call parsed out of the answer, streamed as one delta once
complete: ChatGLM3's ``tool_call(...)`` block or GLM-4's JSON arguments), and token ids shown as the text they
stand for.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from glmtune.templates import ToolCall, parse_tool_call, split_v3_answer
from glmtune_inference.api_schema import (
    ChoiceLogprobs,
    CompletionLogprobs,
    FunctionCall,
    TokenLogprobBody,
    ToolCallBody,
    TopLogprob,
)
from glmtune_inference.generation import TokenLogprob
from glmtune_inference.openai_prompts import ChatPrompt

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class AnswerReader:
    """Reads one choice's answer as it grows: `push` returns the content that can be shown now, `finish` the
    final content and the tool call, if the answer is one."""

    def __init__(self, prompt: ChatPrompt) -> None:
        self.prompt = prompt
        self._raw = ""
        self._shown = ""

    def push(self, delta: str) -> str:
        """Take released text; return the new content to stream (none while a metadata line or a call is open)."""
        self._raw += delta
        content = self._content(self._raw, final=False)
        if content is None or not content.startswith(self._shown):
            return ""
        new, self._shown = content[len(self._shown):], content
        return new

    def finish(self, text: str) -> tuple[str | None, ToolCall | None]:
        """(content, None) for a text answer, (None, call) for a tool call, from the choice's final text."""
        call = self._call(text)
        if call is not None:
            return None, call
        return self._content(text, final=True) or "", None

    def rest(self, text: str) -> str:
        """Final content not streamed yet (normally empty: only a final decode that changed the tail adds some)."""
        content, _ = self.finish(text)
        return content[len(self._shown):] if content and content.startswith(self._shown) else ""

    def _content(self, raw: str, final: bool) -> str | None:
        if not self.prompt.v3:
            return raw
        if self.prompt.forced_tool is not None:
            return None
        split = split_v3_answer(raw)
        if split is None:  # the metadata line is still open (or, at the end, the answer had none)
            return raw.strip() if final else None
        metadata, content = split
        return None if metadata and self.prompt.tools else content

    def _call(self, text: str) -> ToolCall | None:
        if not (self.prompt.v3 and (self.prompt.tools or self.prompt.forced_tool)):
            return None
        if self.prompt.forced_tool is not None:
            return parse_tool_call(self.prompt.forced_tool, text)
        split = split_v3_answer(text)
        if split is None or not split[0]:
            return None
        return parse_tool_call(*split)


def tool_call_body(call: ToolCall) -> ToolCallBody:
    """A parsed call as the API shows it, with a fresh call id."""
    return ToolCallBody(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=call.name,
                                                                                    arguments=call.arguments))


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """The text a token stands for and its UTF-8 bytes (a byte-fallback piece is its one byte, shown as
    `bytes:\\xNN` like OpenAI shows a partial character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    byte = _BYTE_PIECE.fullmatch(piece or "")
    if byte:
        value = int(byte.group(1), 16)
        return f"bytes:\\x{value:02x}", [value]
    text = tokenizer.convert_tokens_to_string([piece]) if piece else ""
    if piece and piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text  # SentencePiece drops the space a piece starts with when it is decoded alone
    return text, list(text.encode("utf-8"))


def chat_logprobs(tokenizer: Any, logprobs: tuple[TokenLogprob, ...]) -> ChoiceLogprobs:
    """Chat completions' `logprobs.content` for the given tokens."""
    content = []
    for item in logprobs:
        text, raw = token_text(tokenizer, item.token_id)
        top = []
        for token_id, value in item.top:
            alt_text, alt_raw = token_text(tokenizer, token_id)
            top.append(TopLogprob(token=alt_text, logprob=value, bytes=alt_raw))
        content.append(TokenLogprobBody(token=text, logprob=item.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer: Any, logprobs: tuple[TokenLogprob, ...], offset: int) -> CompletionLogprobs:
    """The legacy completions' log-probabilities of the given tokens, text offsets counted from `offset`."""
    tokens, values, tops, offsets = [], [], [], []
    for item in logprobs:
        text, _ = token_text(tokenizer, item.token_id)
        tokens.append(text)
        values.append(item.logprob)
        tops.append({token_text(tokenizer, token_id)[0]: value for token_id, value in item.top})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
