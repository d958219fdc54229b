"""Parallel encoding: samples are cut into fixed chunks, encoded (and packed) by forked workers, in order.

Fixed chunk boundaries make the output independent of the number of workers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from glmtune_trainer.data.encode import SampleEncoder, Window
from glmtune_trainer.data.formats import Sample
from glmtune_trainer.data.packing import pack_lengths

_WORKER: dict = {}


def init_worker(tokenizer_dir: str, template: str, strategy: str, max_length: int) -> None:
    from glmtune.tokenization import load_tokenizer

    _WORKER["encoder"] = SampleEncoder(load_tokenizer(tokenizer_dir), template, strategy, max_length)


def encode_chunk(chunk: list[tuple[int, Sample]]) -> tuple[list[list[Window]], int, int]:
    """Encode (and pack) one chunk: (sequences, samples, truncated samples)."""
    encoder: SampleEncoder = _WORKER["encoder"]
    windows: list[Window] = []
    truncated = 0
    for index, sample in chunk:
        pieces = encoder.encode(sample, index)
        truncated += any(w.truncated for w in pieces)
        windows.extend(pieces)
    if encoder.strategy == "packing":
        sequences = [
            [windows[i] for i in group]
            for group in pack_lengths([len(w) for w in windows], encoder.max_length)
        ]
    else:
        sequences = [[w] for w in windows]
    return sequences, len(chunk), truncated


def ordered_map(pool, chunks: Iterator[list], ahead: int) -> Iterator[tuple]:
    """Like pool.imap, but never reads more than `ahead` chunks ahead (memory stays flat on huge inputs)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(encode_chunk, (chunk,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def chunks(samples: Iterator[Sample], size: int) -> Iterator[list[tuple[int, Sample]]]:
    chunk: list[tuple[int, Sample]] = []
    for index, sample in enumerate(samples):
        chunk.append((index, sample))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
