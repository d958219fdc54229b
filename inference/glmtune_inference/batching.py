"""Batched decoding over per-request KV caches: requests that arrive together are prefilled in one
left-padded forward, then join one left-padded batch cache that advances every running request by one
token per forward.

A request's padding columns are masked out in both forwards, so greedy answers are token-identical to
unbatched ones (to float32 rounding, as `generate()` on a padded batch). The p-tuning v2 prefix of a prefix
model stays in the first `prefix_len` cache columns (the model treats columns its 2-D mask does not cover as
visible prefix), so padding is inserted after it. Requests with the very same prompt (a request's `n` choices)
share one prefill row, copied into each one's cache row.

Where a family places decode tokens itself (ChatGLM-6B's 2D positions), the model says so through its
`decode_position_ids` method: nothing here depends on the family.

Everything a step makes lives on the model's device (ids, mask, positions, sampling); the host keeps its own
count of each row's real cache columns, so trimming padding never reads the mask back, and the chosen token
ids are the one device-to-host copy of a step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from glmtune.export_loading import model_device
from glmtune.modeling.hf_compat import output_cache
from glmtune_inference.generation import (
    GenerationParams,
    TextDeltaDecoder,
    TokenLogprob,
    choose_tokens,
    make_rng,
    token_logprobs,
)
from glmtune_inference.kv_cache import GrowingCache, cache_bytes


def host_tensor(data: list | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(data)` (or a host tensor) on `device`. For a GPU it is staged in pinned memory and copied without
    blocking: a plain copy from pageable memory makes the host wait for the device (a sync torch's sync debug mode
    reports)."""
    tensor = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return tensor if device.type == "cpu" else tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class DecodeSequence:
    """One request's decoding state: prompt, answer ids so far, and the text already released."""

    prompt_ids: list[int]
    params: GenerationParams
    decoder: TextDeltaDecoder
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    deadline: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per answer token, when params.logprobs is set

    def __post_init__(self) -> None:
        self.budget = self.params.new_token_budget(len(self.prompt_ids))
        self.stop_ids = frozenset(self.params.stop_token_ids)
        self.rng = make_rng(self.params.seed)
        if self.budget == 0:
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def seen_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Prompt and answer ids (for the repetition penalty) on `device`; empty when no penalty applies."""
        if self.params.repetition_penalty == 1.0:
            return torch.empty(0, dtype=torch.long, device=device)
        return host_tensor(self.prompt_ids + self.generated, torch.long, torch.device(device))

    def answer_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Answer ids so far (for the presence/frequency penalties) on `device`; empty when neither applies."""
        if not self.params.penalizes_answer or not self.generated:
            return torch.empty(0, dtype=torch.long, device=device)
        return host_tensor(self.generated, torch.long, torch.device(device))

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Take the next sampled token; returns the newly released text and sets `finish_reason` when done."""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.decoder.finish(self.generated)
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        delta = self.decoder.push(self.generated)
        if self.decoder.stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.budget:
            self.finish_reason = "length"
            delta += self.decoder.finish(self.generated)
        return delta

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class DecodeBatch:
    """The running requests of one model and their shared, left-padded KV cache."""

    def __init__(self, model: torch.nn.Module, prefix_len: int = 0) -> None:
        self.model = model
        self.device = model_device(model)
        self.prefix_len = prefix_len
        self.sequences: list[DecodeSequence] = []
        self._cache: GrowingCache | None = None
        self._mask: torch.Tensor | None = None  # [b, columns after the prefix], 1 = real token
        self._real: list[int] = []  # per row: its real (right-aligned) columns of `_mask`, known on the host

    def __len__(self) -> int:
        return len(self.sequences)

    def kv_bytes(self) -> int:
        """Bytes held by this batch's KV cache buffers (spare room included); 0 once every request left."""
        cache = self._cache
        return 0 if cache is None else cache_bytes(cache)

    def prefill(self, seq: DecodeSequence) -> str:
        """Run one prompt, choose its first token, and let the request join the batch if it goes on."""
        return self.prefill_many([seq])[0][1]

    @torch.inference_mode()
    def prefill_many(self, seqs: list[DecodeSequence]) -> list[tuple[DecodeSequence, str]]:
        """Run prompts that arrived together in left-padded forwards (a burst waits for one prefill, not for one
        after another) and choose each first token; requests that go on join the batch. Prompts of very
        different lengths go to separate forwards, so padding never costs more than half the real tokens."""
        deltas: dict[int, str] = {}
        for group in _length_groups([seq for seq in seqs if not seq.finished]):
            deltas.update(self._prefill_group(group))
        return [(seq, deltas.get(id(seq), "")) for seq in seqs]

    def _prefill_group(self, live: list[DecodeSequence]) -> dict[int, str]:
        # One forward row per distinct prompt: the n choices of a request are prefilled once.
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(s.prompt_ids), len(unique)) for s in live]
        prompts = [list(prompt) for prompt in unique]
        width = max(len(prompt) for prompt in prompts)
        pad = self.model.config.pad_token_id or 0
        ids = host_tensor([[pad] * (width - len(p)) + p for p in prompts], torch.long, self.device)
        mask = host_tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], torch.long, self.device)
        real = [len(p) for p in prompts]
        for seq in live:  # a seeded request draws from a generator on the device its logits are on
            if seq.params.seed is not None and (seq.rng is None or seq.rng.device != self.device):
                seq.rng = make_rng(seq.params.seed, self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask, past_key_values=GrowingCache(), use_cache=True, logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        if len(prompts) < len(live):
            logits = logits[host_tensor(row_of, torch.long, logits.device)]
        deltas = self._choose_and_accept(live, logits)
        going_on = [i for i, seq in enumerate(live) if not seq.finished]
        if going_on:
            rows = [row_of[i] for i in going_on]
            cache, kept_mask = self._keep_rows(output_cache(out), mask, real, rows)
            self._join([live[i] for i in going_on], cache, kept_mask, [real[row] for row in rows])
        return deltas

    def _choose_and_accept(self, seqs: list[DecodeSequence], logits: torch.Tensor) -> dict[int, str]:
        """Choose each row's next token, let its request take it (with its log-probabilities when asked), and
        return the released text by request."""
        params = [s.params for s in seqs]
        answers = [s.answer_ids(self.device) for s in seqs] if any(p.penalizes_answer for p in params) else None
        tokens = choose_tokens(logits, params, [s.seen_ids(self.device) for s in seqs], [s.rng for s in seqs],
                               answers)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        asking = [i for i, p in enumerate(params) if p.logprobs is not None]
        if asking:
            rows = host_tensor(asking, torch.long, logits.device)
            found = token_logprobs(logits[rows], [tokens[i] for i in asking], [params[i].logprobs for i in asking])
            for i, value in zip(asking, found, strict=True):
                logprobs[i] = value
        return {id(seq): seq.accept(token, logprob)
                for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True)}

    @torch.inference_mode()
    def step(self) -> list[tuple[DecodeSequence, str]]:
        """One forward for every running request; returns (request, released text) pairs."""
        if not self.sequences:
            return []
        ids = host_tensor([[seq.generated[-1]] for seq in self.sequences], torch.long, self.device)
        mask = torch.cat((self._mask, torch.ones_like(ids)), dim=1)
        real = [n + 1 for n in self._real]
        positions = self.model.decode_position_ids([s.prompt_ids for s in self.sequences],
                                                   [len(s.generated) for s in self.sequences])
        if positions is not None:
            positions = host_tensor(positions, torch.long, self.device)
        # Without padding the mask says nothing: leaving it out spares the model a mask (and, for ChatGLM2, the
        # device-to-host check of whether it is all ones).
        padded = min(real) < mask.shape[1]
        out = self.model(
            input_ids=ids, attention_mask=mask if padded else None, position_ids=positions,
            past_key_values=self._cache, use_cache=True, logits_to_keep=1,
        )
        self._cache, self._mask, self._real = output_cache(out), mask, real
        running = self.sequences
        deltas = self._choose_and_accept(running, out.logits[:, -1])
        return [(seq, deltas[id(seq)]) for seq in running]

    def remove_finished(self, now: float | None = None) -> list[DecodeSequence]:
        """Drop finished, cancelled and expired requests (marking the latter two) and shrink the cache."""
        now = time.monotonic() if now is None else now
        for seq in self.sequences:
            if not seq.finished and seq.cancelled:
                seq.finish_reason = "cancelled"
            elif not seq.finished and seq.expired(now):
                seq.finish_reason = "timeout"
        keep = [i for i, seq in enumerate(self.sequences) if not seq.finished]
        gone = [seq for seq in self.sequences if seq.finished]
        if not gone:
            return []
        self.sequences = [self.sequences[i] for i in keep]
        if not keep:  # dropping the last references frees the cache buffers (on CUDA: back to torch's pool)
            self._cache, self._mask, self._real = None, None, []
            return gone
        self._cache, self._mask = self._keep_rows(self._cache, self._mask, self._real, keep)
        self._real = [self._real[i] for i in keep]
        return gone

    def _keep_rows(self, cache: GrowingCache, mask: torch.Tensor, real: list[int],
                   rows: list[int]) -> tuple[GrowingCache, torch.Tensor]:
        """The cache and mask of only `rows` (copied, so the dropped rows' memory is freed), without the columns
        that are padding for every one of them; `real` counts each row's real columns (right-aligned)."""
        index = host_tensor(rows, torch.long, mask.device)
        mask = mask[index]
        first_real = mask.shape[1] - max(real[i] for i in rows)
        kept = GrowingCache([
            (self._select(k, index, first_real), self._select(v, index, first_real)) for k, v in _layers(cache)
        ])
        return kept, mask[:, first_real:]

    def _select(self, tensor: torch.Tensor, index: torch.Tensor, cut: int) -> torch.Tensor:
        rows = tensor[index]
        p = self.prefix_len
        if cut == 0:
            return rows
        return torch.cat((rows[:, :, :p], rows[:, :, p + cut :]), dim=2)

    def _join(self, seqs: list[DecodeSequence], cache: GrowingCache, mask: torch.Tensor, real: list[int]) -> None:
        if self._cache is None:
            self.sequences, self._cache, self._mask, self._real = list(seqs), cache, mask, list(real)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = [
            (torch.cat((self._pad(k0, width), self._pad(k1, width))), torch.cat((self._pad(v0, width),
                                                                              self._pad(v1, width))))
            for (k0, v0), (k1, v1) in zip(_layers(self._cache), _layers(cache), strict=True)
        ]
        self._cache = GrowingCache(layers)
        self._mask = torch.cat((_pad_left(self._mask, width), _pad_left(mask, width)))
        self._real.extend(real)
        self.sequences.extend(seqs)

    def _pad(self, tensor: torch.Tensor, width: int) -> torch.Tensor:
        """Insert zero columns after the prefix so the token part of the cache is `width` wide."""
        p = self.prefix_len
        missing = width - (tensor.shape[2] - p)
        if missing == 0:
            return tensor
        zeros = tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
        return torch.cat((tensor[:, :, :p], zeros, tensor[:, :, p:]), dim=2)


def _length_groups(seqs: list[DecodeSequence]) -> list[list[DecodeSequence]]:
    """Split prompts, longest first, into groups whose padded size stays within 1.5x their real tokens
    (plus 64 tokens of slack, so short prompts always share a forward)."""
    groups: list[list[DecodeSequence]] = []
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids), reverse=True):
        if groups:
            group = groups[-1]
            real = sum(len(s.prompt_ids) for s in group) + len(seq.prompt_ids)
            if len(group[0].prompt_ids) * (len(group) + 1) <= 1.5 * real + 64:
                group.append(seq)
                continue
        groups.append([seq])
    return groups


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat((mask.new_zeros(mask.shape[0], missing), mask), dim=1)


def _layers(cache: GrowingCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]
