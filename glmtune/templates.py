"""Chat templates: the ONE place prompts are built, for training and inference alike (torch-free).

  * ``v1`` (ChatGLM-6B): no history -> the bare query; else ``[Round i]\\n问：{q}\\n答：{a}\\n`` per past turn
    (i from 0) then ``[Round n]\\n问：{query}\\n答：``. Ids: prompt text + ``[gMASK] <sop>``.
  * ``v2`` (ChatGLM2-6B): ``[Round i]\\n\\n问：{q}\\n\\n答：{a}\\n\\n`` per past turn (i from 1) then
    ``[Round n]\\n\\n问：{query}\\n\\n答：``, also without history. Ids: ``[gMASK] sop`` + prompt text.
  * ``v3`` (ChatGLM3-6B, its ``build_chat_input``): ``[gMASK] sop``, then per message ``<|role|>`` + metadata
    (always empty here) + ``"\\n"`` + content, each part tokenized on its own; ``<|assistant|>`` opens the
    answer. Rendered as text this is ``<|role|>\\n {content}`` (ChatGLM3's own chat_template: the space
    stands for the dummy prefix SentencePiece puts before each separately encoded content).

v1 and v2 have no system role: a system text goes first, as its own paragraph (``{system}\\n`` for v1,
``{system}\\n\\n`` for v2). The answer the model learns ends with the end token (v1 ``<eop>``, v2/v3 ``</s>``).
The tokenizer is used through its public API only (`encode`, `get_command`, `eos_token_id`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from glmtune.errors import InvalidInputError

TEMPLATES = ("v1", "v2", "v3")
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
    parts = [f"<|system|>{_v3_content(system)}"] if system else []
    parts += [f"<|user|>{_v3_content(q)}<|assistant|>{_v3_content(a)}" for q, a in history]
    parts.append(f"<|user|>{_v3_content(query)}<|assistant|>")
    return "".join(parts)


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's ids in three parts, so data strategies can cut the body and keep the rest."""

    prefix_ids: list[int]  # special tokens before the text   (v1: []; v2/v3: [gMASK, sop])
    body_ids: list[int]  # prompt text tokens (history + query; v3 role tokens) — the part strategies may cut
    suffix_ids: list[int]  # tokens that open the answer (v1: [gMASK, <sop>]; v2: []; v3: [<|assistant|>])

    @property
    def ids(self) -> list[int]:
        """prefix + body + suffix: exactly what inference feeds to generate()."""
        return self.prefix_ids + self.body_ids + self.suffix_ids


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _v3_message(tokenizer: Any, role: str, content: str) -> list[int]:
    # role tokens typed inside content stay text, as in ChatGLM3 (no role injection from data)
    content_ids = tokenizer.encode(content, add_special_tokens=False, split_special_tokens=True) if content else []
    return [tokenizer.get_command(f"<|{role}|>")] + _text_ids(tokenizer, "\n") + list(content_ids)


def encode_prompt(tokenizer: Any, template: str, query: str, history: Sequence[tuple[str, str]] = (),
                  system: str | None = None) -> EncodedPrompt:
    """The ids of `render_prompt(...)` with the family's special tokens, split into prefix/body/suffix."""
    _check(template)
    gmask_sop = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    if template in ("v1", "v2"):
        body = _text_ids(tokenizer, render_prompt(template, query, history, system))
        return EncodedPrompt([], body, gmask_sop) if template == "v1" else EncodedPrompt(gmask_sop, body, [])
    body = _v3_message(tokenizer, "system", system) if system else []
    for question, answer in history:
        body += _v3_message(tokenizer, "user", question) + _v3_message(tokenizer, "assistant", answer)
    body += _v3_message(tokenizer, "user", query)
    return EncodedPrompt(gmask_sop, body, [tokenizer.get_command("<|assistant|>")])


def encode_answer(tokenizer: Any, template: str, answer: str) -> list[int]:
    """The tokens the model learns to produce after the prompt: the answer plus the end token."""
    _check(template)
    if template == "v3":
        # after <|assistant|> the model writes the (empty) metadata line, then the content
        return _v3_message(tokenizer, "assistant", answer)[1:] + [tokenizer.eos_token_id]
    return _text_ids(tokenizer, answer) + [tokenizer.eos_token_id]


def answer_window_prefix(tokenizer: Any, template: str) -> list[int]:
    """What starts a continuation window of a long answer: ``[gMASK, sop]`` (v3 adds ``<|assistant|>``)."""
    _check(template)
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    return prefix + [tokenizer.get_command("<|assistant|>")] if template == "v3" else prefix


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end generation: the end token, and for v3 also ``<|user|>`` and ``<|observation|>``."""
    _check(template)
    stops = [tokenizer.eos_token_id]
    if template == "v3":
        stops += [tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    return stops


def decode_answer(tokenizer: Any, template: str, ids: Sequence[int]) -> str:
    """The answer text in generated `ids` (up to the first stop token), as the original chat() shows it:
    stripped; v3 without its metadata line; v1 with full-width punctuation next to CJK characters."""
    _check(template)
    stops = set(stop_token_ids(tokenizer, template))
    ids = list(ids)
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    text = tokenizer.decode(ids[:end], skip_special_tokens=True)
    if template == "v3" and "\n" in text:
        text = text.split("\n", 1)[1]
    text = text.strip()
    if template == "v1":
        for ascii_mark, full_width in _V1_PUNCTUATION:
            mark = re.escape(ascii_mark)
            text = re.sub(f"({_CJK}){mark}", rf"\1{full_width}", text)
            text = re.sub(f"{mark}({_CJK})", rf"{full_width}\1", text)
    return text
