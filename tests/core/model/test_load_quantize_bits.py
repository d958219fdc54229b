"""quantize_weight's block path (what quantize-at-load runs: integer absmax, a rounding add, integer packing)
gives the original one-shot formula's bits on every finite fp16 value: ties, subnormals, the largest values,
zero rows; rows with inf or NaN take the original formula itself."""

from __future__ import annotations

import pytest
import torch

from glmtune.modeling.quantization import pack_int4, quantize_weight


def one_shot(weight: torch.Tensor, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The original QuantizedLinear formula on the whole weight at once."""
    converted = weight.to(dtype)
    scale = (converted.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    values = torch.round(converted / torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]).to(torch.int8)
    return (pack_int4(values) if bits == 4 else values), scale


def every_fp16_up_to(limits: list[float]) -> torch.Tensor:
    """One row per limit holding every finite fp16 value v with |v| <= limit (so the row's absmax is the limit
    and its quotients cover the whole grid), shuffled so that packed pairs mix signs, zero-padded to one width."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    every = every[torch.isfinite(every)]
    generator = torch.Generator().manual_seed(0)
    rows = [every[every.abs() <= limit] for limit in limits]
    rows = [row[torch.randperm(len(row), generator=generator)] for row in rows]
    width = max(len(row) for row in rows) + 2
    out = torch.zeros(len(rows), width, dtype=torch.float16)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


# absmax 7 and 127: scale exactly 1 for int4 / int8, so every half-integer quotient is a tie; tiny limits give
# subnormal weights and scales that underflow to 0; 65504 is fp16's largest value; an all-zero row.
LIMITS = [7.0, 127.0, 1.0, 0.5, 0.0213, 6.1e-5, 3.0e-7, 65504.0, 1234.5, 0.0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_fp16_weight_value_quantizes_to_the_one_shot_formulas_bits(bits: int, dtype: torch.dtype) -> None:
    weight = every_fp16_up_to(LIMITS)
    expected_q, expected_scale = one_shot(weight, bits, dtype)
    qweight, scale = quantize_weight(weight, bits, dtype=dtype)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(qweight, expected_q)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rows_with_inf_or_nan_get_the_one_shot_formulas_bits(bits: int, dtype: torch.dtype) -> None:
    weight = (torch.randn(6, 4096, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    weight[1, 7] = float("inf")
    weight[3, 100] = float("nan")
    weight[4, 9] = -float("inf")
    expected_q, expected_scale = one_shot(weight, bits, dtype)
    qweight, scale = quantize_weight(weight, bits)
    assert torch.equal(qweight, expected_q)
    assert torch.equal(scale.isnan(), expected_scale.isnan())
    assert torch.equal(scale.nan_to_num(), expected_scale.nan_to_num())


def test_blocks_are_quantized_on_one_intra_op_thread_and_the_count_is_restored(monkeypatch) -> None:
    """Each op on a cache-sized block is too small to split across threads (and a second thread on a busy
    core stalls every op), so quantizing runs on one; the caller's setting comes back afterwards."""
    seen: list[int] = []
    real_div = torch.div

    def div(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_div(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch, "div", div)
        weight = torch.randn(600, 256, generator=torch.Generator().manual_seed(2)).half()
        expected = one_shot(weight, 4, torch.float16)
        got = quantize_weight(weight, 4)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    finally:
        torch.set_num_threads(before)
