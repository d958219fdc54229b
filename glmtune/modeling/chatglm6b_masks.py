"""ChatGLM-6B (v1) prefix-LM masks and 2D position ids, built from token ids and a 0/1 padding mask.

These reproduce the original tokenizer's `_pad` (left padding) and the original model's `get_masks` /
`get_position_ids` (no padding mask): the context up to, not including, `<sop>` is bidirectional, the rest
causal; position ids count the context and then stay at the `[gMASK]` (else `[MASK]`) index, block position
ids are 0 over the context and 1, 2, 3... from `<sop>` on. Padding (0 in the mask) may sit anywhere; pads
get position 0/0 and are masked both as queries and as keys. The data pipeline can call these to build the
explicit masks/positions it packs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmtune.errors import InvalidInputError


def _first_index(hits: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row of a [b, L] bool tensor, -1 where the row has none."""
    idx = torch.arange(hits.shape[-1], device=hits.device).expand_as(hits)
    first = torch.where(hits, idx, hits.shape[-1]).min(dim=-1).values
    return torch.where(first == hits.shape[-1], -1, first)


def _real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise InvalidInputError(
            f"2-D attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}",
            where="attention_mask",
        )
    return attention_mask.bool()


def sop_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, bos_token_id: int) -> torch.Tensor:
    """Per-row index of the first real `<sop>` (bos) token, -1 where a row has none."""
    return _first_index((input_ids == bos_token_id) & _real_tokens(input_ids, attention_mask))


def glm_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    bos_token_id: int,
    mask_token_id: int,
    gmask_token_id: int,
) -> torch.Tensor:
    """Position ids [b, 2, L] (row 0 positions, row 1 block positions) of the original code.

    Every row must hold a `<sop>` and a `[gMASK]` or `[MASK]` among its real tokens (the tokenizer appends
    `[gMASK] <sop>` to every prompt); otherwise the generation anchor is undefined and this raises.
    """
    real = _real_tokens(input_ids, attention_mask)
    sop = _first_index((input_ids == bos_token_id) & real)
    gmask = _first_index((input_ids == gmask_token_id) & real)
    mask = torch.where(gmask >= 0, gmask, _first_index((input_ids == mask_token_id) & real))
    for name, found in (("<sop> (bos_token_id)", sop), ("[gMASK]/[MASK]", mask)):
        missing = (found < 0).nonzero().flatten().tolist()
        if missing:
            raise InvalidInputError(
                f"batch rows {missing} contain no {name} token, so ChatGLM-6B positions are undefined; "
                "build prompts with the ChatGLM tokenizer (it appends [gMASK] <sop>) or pass position_ids",
                where="input_ids",
            )
    rank = (real.long().cumsum(-1) - 1).clamp(min=0)
    idx = torch.arange(input_ids.shape[-1], device=input_ids.device)
    in_context = idx[None, :] < sop[:, None]
    sop_rank = rank.gather(1, sop[:, None])
    mask_rank = rank.gather(1, mask[:, None])
    positions = torch.where(in_context, rank, mask_rank) * real
    blocks = torch.where(in_context, 0, rank - sop_rank + 1) * real
    return torch.stack((positions, blocks), dim=1)


def prefix_lm_keep(sop: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Bool [b, 1, L, L], True = may attend: key <= query or key before `<sop>`; pad rows and columns closed.

    `sop` [b] is the per-row `<sop>` index (-1 or 0: plain causal), `real` [b, L] the non-pad tokens.
    """
    length = real.shape[-1]
    idx = torch.arange(length, device=real.device)
    causal = idx[None, None, :] <= idx[None, :, None]
    keep = causal | (idx[None, None, :] < sop[:, None, None])
    keep = keep & real[:, None, :] & real[:, :, None]
    return keep[:, None]


def glm_attention_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, bos_token_id: int
) -> torch.Tensor:
    """The original bool attention mask [b, 1, L, L] with True = masked (rows without `<sop>`: causal)."""
    real = _real_tokens(input_ids, attention_mask)
    return ~prefix_lm_keep(sop_index(input_ids, attention_mask, bos_token_id), real)


def decode_position_ids(
    prompts: Sequence[Sequence[int]], generated: Sequence[int], *, bos_token_id: int, mask_token_id: int,
    gmask_token_id: int,
) -> torch.Tensor:
    """Position ids [b, 2, 1] of the token a decode step feeds for each unpadded prompt that has `generated`
    answer tokens so far: the `[gMASK]` (else `[MASK]`) index and the block position counting on from `<sop>`,
    i.e. the last column `glm_position_ids` gives prompt + answer. Pure Python on the host: a step never
    rebuilds whole position tensors."""
    rows = []
    for row, (ids, count) in enumerate(zip(prompts, generated, strict=True)):
        anchor = _first_of(ids, gmask_token_id)
        anchor = anchor if anchor >= 0 else _first_of(ids, mask_token_id)
        sop = _first_of(ids, bos_token_id)
        if sop < 0 or anchor < 0:
            raise InvalidInputError(f"prompt {row} has no <sop> and [gMASK]/[MASK] token, so ChatGLM-6B "
                                    "positions are undefined; build prompts with the ChatGLM tokenizer",
                                    where="input_ids")
        rows.append([[anchor], [len(ids) + count - sop]])
    return torch.tensor(rows, dtype=torch.long)


def _first_of(ids: Sequence[int], token: int) -> int:
    try:
        return ids.index(token)
    except ValueError:
        return -1
