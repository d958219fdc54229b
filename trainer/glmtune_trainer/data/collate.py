"""Collation: stored sequences → model inputs, padded to the longest in the batch, with explicit masks.

Every batch carries the model contract's explicit inputs, so padded and packed batches take one path:
  * `input_ids` [b, L] int64, right-padded with the pad id; `labels` [b, L] int64, -100 off the answers;
  * `attention_mask` [b, 1, L, L] bool, True = masked: block-diagonal per window (a window never sees
    another), causal inside it, plus v1's bidirectional context before `<sop>` (prefix LM); a pad token
    sees only itself (no fully masked row, so no NaN);
  * `position_ids`: v1 [b, 2, L] (positions 0..c-1 over the context then the [gMASK] index c-1; block
    positions 0 over the context then 1, 2, ...), v2/v3 [b, L] (0..n-1) — restarting in every window.
With `segment_ids` the batch also has `segment_ids` [b, L] (window number in the row, -1 for padding),
for per-sample losses; it is not a model input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from glmtune_trainer.data.records import IGNORE_INDEX, SequenceRecord


@dataclass(frozen=True)
class Collator:
    """Pads a list of `SequenceRecord`s into one batch of tensors (see the module docstring)."""

    family: str
    pad_token_id: int
    pad_to_multiple_of: int = 1
    segment_ids: bool = False

    def __call__(self, records: Sequence[SequenceRecord]) -> dict:
        import torch

        longest = max(len(r.input_ids) for r in records)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(records)
        input_ids = np.full((batch, length), self.pad_token_id, dtype=np.int64)
        labels = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
        masked = np.ones((batch, 1, length, length), dtype=bool)
        v1 = self.family == "v1"
        positions = np.zeros((batch, 2, length) if v1 else (batch, length), dtype=np.int64)
        segments = np.full((batch, length), -1, dtype=np.int64)
        causal = np.tri(length, dtype=bool)
        for row, record in enumerate(records):
            n = len(record.input_ids)
            input_ids[row, :n] = record.input_ids
            labels[row, :n] = record.labels()
            for number, (start, size, _, context, _) in enumerate(record.segments.tolist()):
                end = start + size
                allowed = causal[:size, :size].copy()
                allowed[:, :context] = True
                masked[row, 0, start:end, start:end] = ~allowed
                segments[row, start:end] = number
                steps = np.arange(size)
                if v1:
                    positions[row, 0, start:end] = np.where(steps < context, steps, context - 1)
                    positions[row, 1, start:end] = np.where(steps < context, 0, steps - context + 1)
                else:
                    positions[row, start:end] = steps
            pads = np.arange(n, length)
            masked[row, 0, pads, pads] = False
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(masked),
            "position_ids": torch.from_numpy(positions),
        }
        if self.segment_ids:
            out["segment_ids"] = torch.from_numpy(segments)
        return out
