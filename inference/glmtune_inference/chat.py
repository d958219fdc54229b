"""`chat()` and `stream_chat()` over a loaded model: one conversation, history kept by the caller.

They run the same decode code as the server's batching engine (a batch of one), so an answer here is the
answer the server gives for the same greedy request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from glmtune_inference.batching import DecodeBatch, DecodeSequence
from glmtune_inference.generation import TextDeltaDecoder
from glmtune_inference.loading import LoadOptions, ServedModel, load_served_models


class ChatModel:
    """A served model used directly in-process (no server, no queue)."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.last_finish_reason: str | None = None

    @classmethod
    def load(cls, model_uri: str, adapter_uri: str | None = None, options: LoadOptions = LoadOptions()) -> ChatModel:
        """Load a model (any export kind, local or s3://), optionally with one adapter/prefix export over it."""
        adapters = {"adapter": adapter_uri} if adapter_uri else {}
        served = load_served_models(model_uri, adapters, name="model", options=options)
        return cls(served["adapter" if adapter_uri else "model"])

    def stream_chat(self, query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None,
                    **params: Any) -> Iterator[str]:
        """Yield the answer as text deltas; `params` are `GenerationParams` fields (max_new_tokens, top_p, ...,
        stop). After the last delta, `last_finish_reason` says "stop" or "length"."""
        gen = self.served.params(**params)
        seq = DecodeSequence(self.served.encode(query, history, system), gen,
                             TextDeltaDecoder(self.served.tokenizer, gen.stop))
        batch = DecodeBatch(self.served.model, self.served.prefix_len)
        self.last_finish_reason = None
        delta = batch.prefill(seq)
        if delta:
            yield delta
        while not seq.finished:
            for _, delta in batch.step():
                if delta:
                    yield delta
            batch.remove_finished()
        self.last_finish_reason = seq.finish_reason

    def chat(self, query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None,
             **params: Any) -> tuple[str, list[tuple[str, str]]]:
        """The whole answer and the history extended by this turn (the original `chat()` contract)."""
        response = "".join(self.stream_chat(query, history, system, **params))
        return response, [*history, (query, response)]
