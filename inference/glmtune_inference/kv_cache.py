"""A KV cache that appends in place: keys/values are views of buffers with room to spare.

transformers' DynamicCache concatenates every layer's whole cache with each new token, so a decode step copies
all keys and values it holds (at 1000 cached tokens on the small v1 model that copy costs more than the
attention itself, and it grows with the batch). Here a token is written into spare room; only when the room
is used up is the cache copied into a larger buffer, `ROOM` tokens at a time. Attention reads the same
values either way (SDPA takes the strided views as they are).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

ROOM = 128  # tokens of spare room added when a layer's buffer is full


class GrowingLayer(DynamicLayer):
    """One layer's keys/values [batch, heads, seq, head_dim] as views of larger buffers."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_room: torch.Tensor | None = None
        self._value_room: torch.Tensor | None = None
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states and return all of them (views, valid until the next update)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        if self._key_room is None or end > self._key_room.shape[-2]:
            self._key_room = self._grow(self._key_room, key_states, end)
            self._value_room = self._grow(self._value_room, value_states, end)
        self._key_room[..., start:end, :] = key_states
        self._value_room[..., start:end, :] = value_states
        self._length = end
        self.keys = self._key_room[..., :end, :]
        self.values = self._value_room[..., :end, :]
        return self.keys, self.values

    def _grow(self, room: torch.Tensor | None, new: torch.Tensor, needed: int) -> torch.Tensor:
        bigger = new.new_empty(*new.shape[:-2], needed + ROOM, new.shape[-1])
        if room is not None and self._length:
            bigger[..., : self._length, :] = room[..., : self._length, :]
        return bigger

    def reset(self) -> None:
        super().reset()
        self._key_room = self._value_room = None
        self._length = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self.keys is not None:
            self._length = self.keys.shape[-2]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuild(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuild(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuild(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _rebuild(self, rows) -> None:
        """Batch-changing operations start a fresh buffer from the reshaped current states."""
        if self.get_seq_length() > 0:
            keys, values = rows(self.keys), rows(self.values)
            self._key_room = self._value_room = None
            self._length = 0
            self.update(keys, values)


class GrowingCache(DynamicCache):
    """A DynamicCache whose layers append in place; optionally filled with (keys, values) per layer."""

    def __init__(self, layers_data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        if layers_data is None:
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)
            return
        layers = []
        for keys, values in layers_data:
            layer = GrowingLayer()
            layer.update(keys, values)
            layers.append(layer)
        Cache.__init__(self, layers=layers)


def cache_bytes(cache: Cache) -> int:
    """Bytes a cache's layers hold (a GrowingLayer's whole buffers, spare room included)."""
    total = 0
    for layer in cache.layers:
        rooms = (getattr(layer, "_key_room", None), getattr(layer, "_value_room", None))
        tensors = rooms if rooms[0] is not None else (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total
