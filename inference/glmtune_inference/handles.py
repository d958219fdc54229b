"""What a submitted request gives back to asyncio: text deltas and one `Finished` per choice, through a
`GenerationHandle` (one choice) or a `ChoiceGroup` (a request's `n` choices, sharing one event queue). The
engine's worker thread fills the queues; the routes iterate them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glmtune_inference.batching import DecodeSequence
from glmtune_inference.generation import TokenLogprob

if TYPE_CHECKING:
    from glmtune_inference.scheduler import ServingEngine


@dataclass(frozen=True)
class TextDelta:
    """Newly released answer text, with the log-probabilities of the tokens taken since the last delta (when the
    request asked for them)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of a request: why it ended, its token counts, its full answer and, when asked, the
    log-probabilities of all its tokens."""

    reason: str  # stop | length | timeout | cancelled | error | out_of_memory
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


class GenerationHandle:
    """One submitted choice: iterate it for `TextDelta`s ending with one `Finished`; `cancel()` to stop."""

    def __init__(self, request_id: str, model: str, seq: DecodeSequence, engine: ServingEngine,
                 loop: asyncio.AbstractEventLoop, events: asyncio.Queue | None = None, index: int = 0) -> None:
        self.id = request_id
        self.model = model
        self.seq = seq
        self.index = index  # the choice's index in its request
        self.kv_tokens = 0  # cache columns admission reserved for this request
        self.logprobs_sent = 0  # answer tokens whose log-probabilities went out with a TextDelta
        self._engine = engine
        self._loop = loop
        self._events: asyncio.Queue = events if events is not None else asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating (client gone or timed out); safe to call at any time, from the event loop."""
        self._engine._cancel(self)

    async def __aiter__(self) -> AsyncIterator[TextDelta | Finished]:
        """The events of a handle submitted alone (`submit`); a group's handles share one queue: iterate the group."""
        while True:
            _, event = await self._events.get()
            yield event
            if isinstance(event, Finished):
                return


class ChoiceGroup:
    """The `n` choices of one request: iterate it for (choice index, event) until every choice finished."""

    def __init__(self, handles: list[GenerationHandle]) -> None:
        self.handles = handles
        self.id = handles[0].id
        self.model = handles[0].model

    def cancel(self) -> None:
        """Stop every choice (client gone or timed out)."""
        for handle in self.handles:
            handle.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
        events, running = self.handles[0]._events, len(self.handles)
        while running:
            index, event = await events.get()
            yield index, event
            running -= isinstance(event, Finished)
