"""Packing: several windows per sequence so almost no computed token is padding.

Best-fit decreasing over a chunk of windows: each window goes into the fullest sequence it still fits in.
Attention stays inside each window (see collate.py), so packed training computes the same per-sample loss.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity; deterministic for the same input.

    Items inside a bin keep their input order, and bins are ordered by their first item.
    """
    if any(n > capacity or n <= 0 for n in lengths):
        raise ValueError(f"every length must be in 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining room, bin id), sorted
    for item in order:
        size = lengths[item]
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            room, bin_id = free.pop(slot)
            bins[bin_id].append(item)
            room -= size
        else:
            bin_id, room = len(bins), capacity - size
            bins.append([item])
        if room > 0:
            bisect.insort(free, (room, bin_id))
    for items in bins:
        items.sort()
    return sorted(bins, key=lambda items: items[0])
