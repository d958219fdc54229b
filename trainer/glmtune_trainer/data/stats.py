"""Token statistics of a record set: length histogram and padding efficiency (real / computed tokens)."""

from __future__ import annotations

import numpy as np

STATS_BATCH_SIZE = 8


def histogram_edges(max_length: int) -> list[int]:
    """Power-of-two bucket edges 0, 32, 64, ... up to and including `max_length`."""
    edges, edge = [0], 32
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    return edges + [max_length]


def padding_efficiency(lengths: np.ndarray, batch_size: int, pad_to: int | None = None) -> float:
    """Real tokens / computed tokens when `lengths` are batched in order and padded to the longest in the batch
    (or to `pad_to`, the seed's pad-to-max-length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return 1.0
    computed = 0
    for start in range(0, lengths.size, batch_size):
        batch = lengths[start : start + batch_size]
        computed += batch.size * (pad_to if pad_to is not None else int(batch.max()))
    return float(lengths.sum() / computed)


def record_stats(
    lengths: np.ndarray, trained_tokens: int, samples: int, truncated: int, windows: int, max_length: int
) -> dict:
    """The `stats` block of a build manifest."""
    lengths = np.asarray(lengths, dtype=np.int64)
    edges = histogram_edges(max_length)
    counts, _ = np.histogram(lengths, bins=edges) if lengths.size else (np.zeros(len(edges) - 1, int), None)
    return {
        "samples": samples,
        "windows": windows,
        "sequences": int(lengths.size),
        "tokens": int(lengths.sum()),
        "trained_tokens": int(trained_tokens),
        "truncated": truncated,
        "truncated_share": truncated / samples if samples else 0.0,
        "mean_length": float(lengths.mean()) if lengths.size else 0.0,
        "max_length_seen": int(lengths.max()) if lengths.size else 0,
        "padding_efficiency": padding_efficiency(lengths, STATS_BATCH_SIZE),
        "padding_efficiency_batch_size": STATS_BATCH_SIZE,
        "padding_efficiency_pad_to_max": padding_efficiency(lengths, STATS_BATCH_SIZE, pad_to=max_length),
        "length_histogram": {"edges": edges, "counts": [int(c) for c in counts]},
    }
