"""One request's generation as the routes see it, streamed (SSE) or collected: time to first token measured
once, per-token time and the access-log fields recorded when each choice ends, generation cancelled when the
client goes away. Every endpoint uses this module, so they all measure and frame alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from glmtune_inference.api_schema import ErrorDetail, ErrorResponse, Usage
from glmtune_inference.app_state import ApiError, state
from glmtune_inference.generation import TokenLogprob
from glmtune_inference.handles import ChoiceGroup, Finished, TextDelta
from glmtune_inference.scheduler import OUT_OF_MEMORY

Event = tuple[int, TextDelta | Finished]
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class IncompleteGeneration(Exception):
    """A choice ended without an answer (timeout, shutdown, out of memory, error)."""

    def __init__(self, detail: ErrorDetail) -> None:
        super().__init__(detail.message)
        self.detail = detail

    def as_api_error(self) -> ApiError:
        status = {"timeout": 504, "server_unavailable": 503}.get(self.detail.type, 500)
        return ApiError(status, self.detail.message, self.detail.type)


class RequestRun:
    """The events of one submitted request (all its choices), with the server's measurements."""

    def __init__(self, request: Request, group: ChoiceGroup, start: float) -> None:
        self.request, self.group, self.start = request, group, start
        self.first_token_at: float | None = None
        self.finished: dict[int, Finished] = {}
        self._logprobs_sent = [0] * len(group.handles)

    async def events(self) -> AsyncIterator[Event]:
        """(choice index, event) pairs until every choice finished; raises `IncompleteGeneration` as soon as one
        choice fails. Leaving early (client gone, failure) cancels the generation."""
        try:
            async for index, event in self.group:
                if isinstance(event, TextDelta) and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    state(self.request).metrics.ttft.observe(self.first_token_at - self.start)
                elif isinstance(event, Finished):
                    self._record(index, event)
                    if event.reason not in ("stop", "length"):
                        raise IncompleteGeneration(incomplete(event))
                yield index, event
        finally:
            if len(self.finished) < len(self.group.handles):
                self.group.cancel()

    async def collect(self) -> list[Finished]:
        """Every choice's `Finished`, in choice order, cancelling generation if the client goes away first; a
        failed choice raises the matching `ApiError` (503, 504, 500)."""

        async def cancel_on_disconnect() -> None:
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
            self.group.cancel()

        watcher = asyncio.create_task(cancel_on_disconnect())
        try:
            async for _ in self.events():
                pass
        except IncompleteGeneration as exc:
            raise exc.as_api_error() from None
        finally:
            watcher.cancel()
        return [self.finished[i] for i in range(len(self.group.handles))]

    def new_logprobs(self, index: int, event: TextDelta | Finished) -> tuple[TokenLogprob, ...]:
        """The log-probabilities a stream has not shown yet for choice `index`: a delta's own, and with `Finished`
        those of tokens that released no text (a stop string's, an unfinished character's)."""
        items = event.logprobs if isinstance(event, TextDelta) else event.logprobs[self._logprobs_sent[index]:]
        self._logprobs_sent[index] += len(items)
        return items

    def usage(self, n: int = 1) -> Usage:
        """Token counts of the request: each prompt once (its `n` choices share it), every choice's answer."""
        handles = self.group.handles
        prompt = sum(len(handles[i].seq.prompt_ids) for i in range(0, len(handles), n))
        completion = sum(done.completion_tokens for done in self.finished.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _record(self, index: int, done: Finished) -> None:
        """Per-token time of the choice and the request's access-log fields."""
        server = state(self.request)
        self.finished[index] = done
        if self.first_token_at is not None and done.completion_tokens > 1:
            elapsed = time.perf_counter() - self.first_token_at
            server.metrics.token_time.observe(elapsed / (done.completion_tokens - 1))
        reasons = [self.finished[i].reason for i in sorted(self.finished)]
        access = {"request_id": self.group.id, "model": self.group.model,
                  "prompt_tokens": done.prompt_tokens,
                  "completion_tokens": sum(f.completion_tokens for f in self.finished.values()),
                  "finish_reason": reasons[0] if len(self.group.handles) == 1 else reasons}
        if server.settings.log_prompts:
            texts = [self.finished[i].text for i in sorted(self.finished)]
            access["response"] = texts[0] if len(self.group.handles) == 1 else texts
        self.request.state.access.update(access)


def sse_response(run: RequestRun, chunks: Callable[[AsyncIterator[Event]], AsyncIterator[BaseModel]]) -> StreamingResponse:
    """A `text/event-stream` of the `data:` events `chunks` makes from the run's events, then `[DONE]`; a choice
    that fails ends the stream with an error event (its status line has long been sent)."""

    async def body() -> AsyncIterator[str]:
        events = run.events()
        try:
            async for chunk in chunks(events):
                yield sse_frame(chunk)
        except IncompleteGeneration as exc:
            yield sse_frame(ErrorResponse(error=exc.detail))
        finally:  # closed at once when the client goes away, not when the garbage collector gets to it
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


def sse_frame(body: BaseModel) -> str:
    """One SSE event (fields that are None left out, as OpenAI's streams do)."""
    return f"data: {body.model_dump_json(exclude_none=True)}\n\n"


def incomplete(done: Finished) -> ErrorDetail:
    """What to tell the client about a choice that ended without an answer."""
    if done.reason == "timeout":
        return ErrorDetail(message="generation exceeded the request timeout", type="timeout")
    if done.reason == "cancelled":
        return ErrorDetail(message="generation was cancelled (server shutting down)", type="server_unavailable")
    if done.reason == OUT_OF_MEMORY:
        return ErrorDetail(message="the server ran out of device memory for this request; retry later or ask for "
                                   "fewer max_tokens", type="server_unavailable")
    return ErrorDetail(message=f"generation failed: {done.error}", type="server_error")
