"""Samples → token windows with labels, by the seed's strategies (`truncation`, `singlesliding`, `doublesliding`).

Prompts come only from `glmtune.templates` (the same ids inference feeds to generate()). A window's loss
covers a contiguous tail (the answer and its end token); everything before it is context (-100).
Strategy semantics, for a prompt P+B+S (special prefix, cuttable body, answer-opening suffix) and answer A
that do not fit in `max_length` together (anything that fits is one window, whatever the strategy):
  * truncation: the body is cut from its end, but keeps at least half the room, so the question is never
    dropped for an over-long answer; answer tokens that still do not fit continue in extra windows
    `answer_window_prefix + next answer tokens` (each answer token trained exactly once).
  * singlesliding: instead of cutting, body windows slide by 2/3 of `max_length` (the last one ends with the
    query), each followed by the first answer chunk; the rest of the answer continues as in truncation.
  * doublesliding: as singlesliding, and the answer windows overlap too: each starts with the previous
    third of a window of answer tokens as untrained context.
`packing` encodes samples as truncation does; `packing.py` then fills whole sequences with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmtune.errors import InvalidInputError
from glmtune_trainer.data.formats import Sample

STRATEGIES = ("truncation", "singlesliding", "doublesliding", "packing")


@dataclass(frozen=True)
class Window:
    """One training window of one sample.

    `untrained` leading tokens are context (label -100), the rest is trained; `bidirectional` leading tokens
    see each other (v1's prefix-LM context before `<sop>`; 0 for the causal v2/v3 models).
    """

    ids: tuple[int, ...]
    untrained: int
    bidirectional: int
    sample: int
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


class SampleEncoder:
    """Encodes `Sample`s for one tokenizer, template, strategy and maximum length."""

    def __init__(self, tokenizer: Any, template: str, strategy: str, max_length: int) -> None:
        from glmtune import templates

        if strategy not in STRATEGIES:
            raise InvalidInputError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        if template not in templates.TEMPLATES:
            raise InvalidInputError(
                f"unknown template {template!r}; use one of {', '.join(templates.TEMPLATES)}"
            )
        self.tokenizer, self.template, self.strategy, self.max_length = (
            tokenizer,
            template,
            strategy,
            max_length,
        )
        self.family = tokenizer.family
        self._templates = templates
        self.window_prefix = list(templates.answer_window_prefix(tokenizer, template))
        if max_length - len(self.window_prefix) < 3:
            raise InvalidInputError(
                f"max_length {max_length} is too small: answer windows need "
                f"{len(self.window_prefix)} special tokens plus room for the answer"
            )

    def _bidirectional(self, context: list[int]) -> int:
        """v1 is a prefix LM: the context before `<sop>` (the last context token) is bidirectional."""
        if self.family != "v1":
            return 0
        if not context or context[-1] != self.tokenizer.sop_token_id:
            raise InvalidInputError(
                f"template {self.template} does not end v1 prompts with <sop>; "
                "use the v1 template with a v1 tokenizer"
            )
        return len(context) - 1

    def _window(self, context: list[int], answer: list[int], index: int, truncated: bool) -> Window:
        return Window(tuple(context + answer), len(context), self._bidirectional(context), index, truncated)

    def encode(self, sample: Sample, index: int) -> list[Window]:
        """All windows of one sample (`index` = its position among the build's samples)."""
        prompt = self._templates.encode_prompt(
            self.tokenizer, self.template, sample.query, sample.history, sample.system
        )
        answer = list(self._templates.encode_answer(self.tokenizer, self.template, sample.answer))
        prefix, body, suffix = list(prompt.prefix_ids), list(prompt.body_ids), list(prompt.suffix_ids)
        room = self.max_length - len(prefix) - len(suffix)
        if room < 2:
            raise InvalidInputError(
                f"max_length {self.max_length} leaves no room after the template's "
                f"{len(prefix) + len(suffix)} special tokens"
            )
        if len(body) + len(answer) <= room:
            return [self._window(prefix + body + suffix, answer, index, False)]
        keep = min(len(body), max(room - len(answer), room - room // 2))
        first = room - keep
        if self.strategy in ("singlesliding", "doublesliding") and keep < len(body):
            stride = max(1, min(keep, (2 * self.max_length) // 3))
            starts = list(range(0, len(body) - keep, stride)) + [len(body) - keep]
        else:
            starts = [0]
        windows = [
            self._window(prefix + body[s : s + keep] + suffix, answer[:first], index, True) for s in starts
        ]
        windows.extend(self._answer_windows(answer, first, index))
        return windows

    def _answer_windows(self, answer: list[int], start: int, index: int) -> list[Window]:
        """The answer tokens from `start` on, in continuation windows (overlapping for doublesliding)."""
        width = self.max_length - len(self.window_prefix)
        overlap = width // 3 if self.strategy == "doublesliding" else 0
        windows, pos = [], start
        while pos < len(answer):
            seen = answer[max(0, pos - overlap) : pos]
            take = answer[pos : pos + width - len(seen)]
            windows.append(
                Window(
                    tuple(self.window_prefix + seen + take),
                    len(self.window_prefix) + len(seen),
                    self._bidirectional(self.window_prefix),
                    index,
                    True,
                )
            )
            pos += len(take)
        return windows
