"""The batching engine: a bounded queue of requests and one worker thread that advances every running
request by one token per forward (continuous batching), streaming text deltas back to asyncio.

The model runs only in the worker thread, so the event loop stays responsive and requests join or leave
the batch between any two steps. Every served model name (base, each adapter) has its own decode batch.

Memory: with a KV budget, a queued request joins the running ones only when every batch would still fit at
full length (see `memory`); until then it waits in the queue (a full queue answers 429), and one that could
never fit is refused at once (503). A forward that still runs out of device memory fails only the requests
of that forward, and the server goes on.

A request with `n` choices is `n` decode sequences queued together (`submit_choices`); the batch prefills their
common prompt once.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping

import torch

from glmtune.errors import GlmtuneError, InvalidInputError
from glmtune_inference.batching import DecodeBatch, DecodeSequence
from glmtune_inference.generation import GenerationParams, TextDeltaDecoder
from glmtune_inference.handles import ChoiceGroup, Finished, GenerationHandle, TextDelta
from glmtune_inference.loading import ServedModel
from glmtune_inference.memory import batch_need, format_bytes, kv_bytes_per_token, request_tokens

log = logging.getLogger("glmtune.inference.engine")


class QueueFullError(GlmtuneError):
    """Every batch slot and queue place is taken; the client should retry later (HTTP 429)."""


class EngineUnavailableError(GlmtuneError):
    """The engine is not running or is draining for shutdown (HTTP 503)."""


class KvBudgetTooSmallError(EngineUnavailableError):
    """The request's KV cache alone exceeds the server's KV budget: it can never run here (HTTP 503)."""


OUT_OF_MEMORY = "out_of_memory"
"""`Finished.reason` of requests whose forward ran out of device memory (HTTP 503)."""


def _deliver(items: list[tuple[asyncio.Queue, tuple[int, TextDelta | Finished]]]) -> None:
    """Runs in the event loop: hand one engine step's events to their requests."""
    for queue, event in items:
        queue.put_nowait(event)


class ServingEngine:
    """Bounded queue + continuous batching over the served models."""

    def __init__(self, models: Mapping[str, ServedModel], *, max_batch: int = 8, queue_size: int = 64,
                 kv_budget: int | None = None, step_observer: Callable[[int], None] | None = None,
                 finish_observer: Callable[[str, Finished], None] | None = None) -> None:
        if not models:
            raise InvalidInputError("at least one model must be served", where="models")
        if kv_budget is not None and kv_budget <= 0:
            raise InvalidInputError(f"must be positive, got {kv_budget}", where="--max-kv-memory")
        self.models = dict(models)
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.kv_budget = kv_budget  # bytes of KV cache admission may promise (None: no limit)
        self._kv_per_token = {name: kv_bytes_per_token(m.model) for name, m in self.models.items()}
        self.step_observer = step_observer  # called with the batch size of every decode forward
        self.finish_observer = finish_observer  # called with (model name, Finished) of every request
        self._batches = {name: DecodeBatch(m.model, m.prefix_len) for name, m in self.models.items()}
        self._handles: dict[int, GenerationHandle] = {}
        self._waiting: collections.deque[GenerationHandle] = collections.deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._accepting = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[GenerationHandle, TextDelta | Finished]] = []

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(len(b) for b in self._batches.values())

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the running requests' KV caches hold now."""
        return sum(batch.kv_bytes() for batch in list(self._batches.values()))

    @property
    def kv_reserved_bytes(self) -> int:
        """Bytes the running requests' KV caches may grow to (each batch at full length)."""
        return self._kv_need([])

    def _kv_need(self, joining: list[GenerationHandle]) -> int:
        """Worst-case KV bytes of the running requests plus `joining`, batch by batch (every row as wide as the
        widest); read in the worker thread, or racing it only for metrics."""
        rows: dict[str, list[int]] = {}
        for name, batch in list(self._batches.items()):
            for seq in list(batch.sequences):
                handle = self._handles.get(id(seq))
                if handle is not None:
                    rows.setdefault(name, []).append(handle.kv_tokens)
        for handle in joining:
            rows.setdefault(handle.model, []).append(handle.kv_tokens)
        return sum(batch_need(self._kv_per_token[model], widths) for model, widths in rows.items())

    def _fits(self, joining: list[GenerationHandle]) -> bool:
        """Whether the running requests and `joining` stay within the KV budget at their full length."""
        return self.kv_budget is None or self._kv_need(joining) <= self.kv_budget

    def start(self) -> None:
        """Start the worker thread and accept requests."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="glmtune-engine", daemon=True)
        self._thread.start()
        self._accepting = True

    def refuse_new(self) -> None:
        """Stop taking requests (submit raises EngineUnavailableError) while queued and running ones go on."""
        with self._lock:
            self._accepting = False

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_timeout` s, cancel the rest, join."""
        self.refuse_new()
        deadline = time.monotonic() + drain_timeout
        with self._lock:
            while (self._waiting or self.running) and time.monotonic() < deadline:
                self._lock.wait(timeout=0.05)
            for handle in list(self._handles.values()):
                handle.seq.cancelled = True
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, model: str, prompt_ids: list[int], params: GenerationParams,
               timeout_s: float | None = None) -> GenerationHandle:
        """Queue a request (call from the event loop); raises QueueFullError / EngineUnavailableError /
        InvalidInputError (a model this engine does not serve) before anything is queued."""
        return self.submit_choices(model, [(prompt_ids, params)], timeout_s).handles[0]

    def submit_choices(self, model: str, choices: list[tuple[list[int], GenerationParams]],
                       timeout_s: float | None = None) -> ChoiceGroup:
        """Queue one request's choices (prompt ids and parameters each, e.g. its own seed) together, all or none
        (call from the event loop). Raises like `submit`."""
        if not choices:
            raise InvalidInputError("a request needs at least one choice", where="n")
        served = self.models.get(model)
        if served is None:
            # The routes answer 404 before they get here; this guards direct callers (benchmarks, chat tools).
            raise InvalidInputError(f"model {model!r} is not served here (GET /v1/models lists them)",
                                    where="model")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        request_id, loop, events = f"req-{next(self._ids)}", asyncio.get_running_loop(), asyncio.Queue()
        handles = []
        for index, (prompt_ids, params) in enumerate(choices):
            seq = DecodeSequence(prompt_ids=list(prompt_ids), params=params,
                                 decoder=TextDeltaDecoder(served.tokenizer, params.stop), deadline=deadline)
            handle = GenerationHandle(request_id, model, seq, self, loop, events, index)
            handle.kv_tokens = request_tokens(len(seq.prompt_ids), seq.budget, served.prefix_len)
            handles.append(handle)
        with self._lock:
            if not self._accepting:
                raise EngineUnavailableError("the server is starting or shutting down")
            if len(self._waiting) + len(handles) > self.queue_size:
                raise QueueFullError(f"{self.running} requests running and {len(self._waiting)} waiting")
            for handle in handles:
                self._admit_memory(handle)
            for handle in handles:
                self._handles[id(handle.seq)] = handle
                self._waiting.append(handle)
            self._lock.notify_all()
        return ChoiceGroup(handles)

    def _admit_memory(self, handle: GenerationHandle) -> None:
        """Refuse a request whose KV cache alone exceeds the budget: it could wait forever."""
        if self.kv_budget is None:
            return
        alone = batch_need(self._kv_per_token[handle.model], [handle.kv_tokens])
        if alone > self.kv_budget:
            raise KvBudgetTooSmallError(
                f"this request's KV cache needs up to {format_bytes(alone)} ({handle.kv_tokens} tokens) but the "
                f"server's KV budget is {format_bytes(self.kv_budget)}: ask for fewer max_tokens or a shorter prompt")

    def _cancel(self, handle: GenerationHandle) -> None:
        with self._lock:
            handle.seq.cancelled = True
            if handle in self._waiting:
                self._waiting.remove(handle)
                self._finish(handle, "cancelled")
            self._lock.notify_all()

    def _finish(self, handle: GenerationHandle, reason: str | None = None, error: str | None = None) -> None:
        seq = handle.seq
        self._handles.pop(id(seq), None)
        done = Finished(reason or seq.finish_reason or "error", seq.decoder.text, len(seq.prompt_ids),
                        seq.completion_tokens, error, tuple(seq.logprobs))
        if self.finish_observer is not None:
            self.finish_observer(handle.model, done)
        self._post(handle, done)

    def _post(self, handle: GenerationHandle, event: TextDelta | Finished) -> None:
        """Queue an event; the worker sends a step's events in one wake-up of the loop (`_flush`)."""
        if threading.current_thread() is self._thread:
            self._outbox.append((handle, event))
        else:
            self._send([(handle, event)])

    def _post_text(self, handle: GenerationHandle, text: str) -> None:
        """Post released text with the log-probabilities of the tokens taken since the last delta."""
        logprobs = tuple(handle.seq.logprobs[handle.logprobs_sent:])
        handle.logprobs_sent = len(handle.seq.logprobs)
        self._post(handle, TextDelta(text, logprobs))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        self._send(outbox)

    @staticmethod
    def _send(events: list[tuple[GenerationHandle, TextDelta | Finished]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, event in events:
            by_loop.setdefault(handle._loop, []).append((handle._events, (handle.index, event)))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is gone (process shutting down): nobody is listening
                pass

    def _run(self) -> None:
        device = next(iter(self._batches.values())).device
        if device.type == "cuda":  # this thread's own current device: lazily made handles and streams go there
            torch.cuda.set_device(device)
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self.running:
                    self._lock.wait()
                if self._stop:
                    break
                admitted = []
                # First come, first served: a request the KV budget cannot hold yet waits (and those behind it).
                while (self._waiting and self.running + len(admitted) < self.max_batch
                       and self._fits([*admitted, self._waiting[0]])):
                    admitted.append(self._waiting.popleft())
            try:
                self._iterate(admitted)
            except Exception as exc:  # a failing forward must not kill the server: fail its requests
                log.exception("engine step failed")
                self._fail_all(str(exc) or type(exc).__name__)
            self._flush()
            with self._lock:
                self._lock.notify_all()
        self._fail_all("the server shut down", reason="cancelled")
        self._flush()

    def _iterate(self, admitted: list[GenerationHandle]) -> None:
        now = time.monotonic()
        arrivals: dict[str, list[GenerationHandle]] = {}
        for handle in admitted:
            seq = handle.seq
            if seq.cancelled or seq.expired(now):
                self._finish(handle, "cancelled" if seq.cancelled else "timeout")
            else:
                arrivals.setdefault(handle.model, []).append(handle)
        for model, handles in arrivals.items():  # one prefill forward for the requests that came together
            by_seq = {id(h.seq): h for h in handles}
            batch = self._batches[model]
            try:
                prefilled = batch.prefill_many([h.seq for h in handles])
            except torch.OutOfMemoryError:
                # Arrivals of an earlier length group may have joined the batch already: they leave it too.
                self._out_of_memory(model, handles)
                continue
            for seq, delta in prefilled:
                if delta:
                    self._post_text(by_seq[id(seq)], delta)
                if seq.finished:
                    self._finish(by_seq[id(seq)])
            self._flush()  # first tokens go out at once, not after the next decode step
        for model, batch in list(self._batches.items()):
            for seq in batch.remove_finished():  # cancelled or expired since the last step
                self._finish(self._handles[id(seq)])
            if not batch.sequences:
                continue
            if self.step_observer is not None:
                self.step_observer(len(batch))
            try:
                stepped = batch.step()
            except torch.OutOfMemoryError:
                # A failed step may have written some layers' caches and not others: the batch cannot go on.
                self._out_of_memory(model, [self._handles[id(seq)] for seq in batch.sequences])
                continue
            for seq, delta in stepped:
                if delta:
                    self._post_text(self._handles[id(seq)], delta)
            for seq in batch.remove_finished():
                self._finish(self._handles[id(seq)])

    def _out_of_memory(self, model: str, handles: list[GenerationHandle]) -> None:
        """Fail `handles` (503) after their forward ran out of device memory; the model's other requests go on."""
        log.warning("model %s: a forward of %d request(s) ran out of device memory; failing them", model,
                    len(handles))
        failed = {id(h.seq) for h in handles}
        batch = self._batches[model]
        for seq in batch.sequences:
            if id(seq) in failed:
                seq.cancelled = True
        batch.remove_finished()  # drops them (and their cache rows)
        for handle in handles:
            if id(handle.seq) in self._handles:
                self._finish(handle, OUT_OF_MEMORY, error="the server ran out of device memory for this request")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed forward's blocks back before the next one

    def _fail_all(self, message: str, reason: str = "error") -> None:
        with self._lock:
            pending = list(self._handles.values())
            self._waiting.clear()
            self._batches = {name: DecodeBatch(m.model, m.prefix_len) for name, m in self.models.items()}
            for handle in pending:
                self._finish(handle, reason, error=message)
