"""Fused weight-only int8 / int4 matmuls for CPU inference: glmtune's own kernels, else torch's.

glmtune's kernels (`glmtune.kernels`, compiled on first use) read the checkpoint's packing as stored and
multiply it by int8-quantized activations (VNNI / AVX2): calls of up to `OWN_KERNEL_ROWS` rows, in any
activation dtype, go there while they can run (`GLMTUNE_CPU_KERNELS=0` turns them off). Otherwise torch's
kernels take up to `MAX_FUSED_ROWS` rows: `_weight_int8pack_mm` multiplies by the checkpoint's int8 weight as
stored, with per-row scales in the activation dtype. `_weight_int4pack_mm_for_cpu` wants its own weight
layout and groupwise (scale, zero) pairs computing `(u - 8) * scale + zero` from unsigned nibbles u: our
signed nibble s is u = s + 8 with zero 0, and the per-row scale is repeated over every group of the row.
That kernel-layout weight is a derived cache (`FusedCache`), never saved: the state dict keeps the
checkpoint's packing.

The kernels read each weight once per call instead of dequantizing it, which wins for decoding (a few
rows); for long prompts dequantize + GEMM is faster, so calls with more rows keep that path.
`GLMTUNE_FUSED_QUANT=0` turns every fused path off (ours and torch's).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from glmtune import kernels

logger = logging.getLogger(__name__)

ENV_SWITCH = "GLMTUNE_FUSED_QUANT"
# Rows (batch x sequence) up to which the fused kernels beat dequantize + matmul at 4096x4096 on 2 cores
# (bench/bench_quant_decode.py, torch 2.13, AVX512-BF16): bf16 has vectorized kernels (int8 breaks even at
# 128 rows, int4 still wins at 256); fp32 and fp16 get scalar ones (even at ~8 rows).
MAX_FUSED_ROWS = {torch.bfloat16: 128, torch.float16: 4, torch.float32: 4}
# torch's CPU int4 kernel accepts these group sizes only; the largest dividing in_features is used.
INT4_GROUP_SIZES = (256, 128, 64, 32)
INT4_ROW_MULTIPLE = 16  # the int4 layout needs out_features % 16 == 0: extra zero rows are sliced off
_CONVERT_ROWS = 1024  # rows converted at a time, bounding the int32 scratch copy (layouts are row-separable)
_INNER_K_TILES = 2
_warned: set[str] = set()
# Rows up to which glmtune's kernels take a call, whatever the activation dtype: at 4096x4096 on 2 cores they beat
# torch's kernels at every row count up to 256 (bf16: int4 1.6x at 128 rows; fp32, where torch's are scalar,
# 25-100x) and dequantize + matmul up to ~256 rows (bench/bench_quant_decode.py --only rows). So torch's int4
# layout (a second copy of the weight, slow to make on the first call) is never built while ours run.
OWN_KERNEL_ROWS = 128


def fused_enabled() -> bool:
    """False when the user set GLMTUNE_FUSED_QUANT=0 (read on every call, so it can be switched at run time)."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("fused CPU int8/int4 kernels not used: %s; falling back to dequantize + matmul", reason)


@functools.cache
def _kernel_available(bits: int) -> bool:
    names = ("_weight_int8pack_mm",) if bits == 8 else (
        "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return all(hasattr(torch.ops.aten, name) for name in names)


def int4_group_size(in_features: int) -> int | None:
    """The group size the int4 kernel runs with for this input width, or None when none divides it."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


@dataclass
class FusedCache:
    """What one QuantizedLinear derives from its stored tensors for the fused kernels.

    `key` names the tensors it was built from (storage pointer and in-place version of weight and scale),
    so a load_state_dict, `.to()` or in-place edit rebuilds it instead of reading stale values.
    """

    key: tuple[int, ...]
    int4_weight: torch.Tensor | None = None
    scales: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    unsupported: str | None = None
    int8_full_range: bool | None = None  # an int8 weight holds -128, which glmtune's AVX2 kernel cannot negate


def _key(qweight: torch.Tensor, scale: torch.Tensor) -> tuple[int, ...]:
    return (qweight.data_ptr(), qweight._version, scale.data_ptr(), scale._version, *qweight.shape)


def _int4_layout(qweight: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 layout of a [out, in/2] signed-nibble weight, zero rows added up to a multiple of 16."""
    rows = qweight.shape[0]
    padded = -(-rows // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE
    chunks = []
    for start in range(0, padded, _CONVERT_ROWS):
        part = qweight[start:start + _CONVERT_ROWS]
        # signed nibble s -> unsigned s + 8 is flipping its top bit: both nibbles of a byte at once, no int8 detour
        flipped = part.view(torch.uint8) ^ 0x88
        unsigned = torch.empty(part.shape[0], part.shape[1] * 2, dtype=torch.int32)
        unsigned[:, 0::2] = flipped >> 4
        unsigned[:, 1::2] = flipped & 0xF
        missing = min(_CONVERT_ROWS, padded - start) - part.shape[0]
        if missing:
            unsigned = torch.cat((unsigned, torch.full((missing, unsigned.shape[1]), 8, dtype=torch.int32)))
        chunks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), _INNER_K_TILES))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def _scales(cache: FusedCache, scale: torch.Tensor, bits: int, in_features: int,
            dtype: torch.dtype) -> torch.Tensor:
    """Per-row scales in `dtype` (int8), or the int4 kernel's [groups, out padded, (scale, zero)] tensor."""
    if dtype not in cache.scales:
        per_row = scale.to(dtype)
        if bits == 4:
            rows = cache.int4_weight.shape[0]
            per_row = torch.cat((per_row, per_row.new_zeros(rows - per_row.shape[0])))
            groups = in_features // int4_group_size(in_features)
            per_row = torch.stack((per_row.expand(groups, rows), per_row.new_zeros(groups, rows)), dim=-1)
        cache.scales[dtype] = per_row.contiguous()
    return cache.scales[dtype]


def _unsupported_reason(bits: int, in_features: int, dtype: torch.dtype) -> str | None:
    if not _kernel_available(bits):
        return f"torch {torch.__version__} has no CPU int{bits} weight-only kernel"
    if bits == 4 and int4_group_size(in_features) is None:
        return f"int4 needs in_features divisible by 32, got {in_features}"
    if bits == 8 and dtype != torch.float32 and in_features % 16:
        # torch 2.13's bf16 int8 kernel reads past the row (wrong values or a crash) for other widths
        return f"int8 with {dtype} activations needs in_features divisible by 16, got {in_features}"
    return None


def fused_forward(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor | None:
    """`inp @ dequant(W)^T` of a QuantizedLinear (no bias) through a fused kernel, or None when this call should
    dequantize instead: grad enabled, not CPU, too many rows, switched off, or a shape/dtype the kernels lack.
    The layer's derived kernel-layout tensors live in its `_fused` attribute."""
    dtype = inp.dtype
    if (torch.is_grad_enabled() or inp.device.type != "cpu" or dtype not in MAX_FUSED_ROWS
            or not fused_enabled()):
        return None
    in_features = inp.shape[-1]
    rows = inp.numel() // max(in_features, 1)
    if rows > max(MAX_FUSED_ROWS[dtype], OWN_KERNEL_ROWS) or rows == 0 or in_features != layer.in_features:
        return None  # (a wrong width gets the plain path's error message)
    qweight, scale, bits = layer.weight, layer.weight_scale, layer.bits
    key = _key(qweight, scale)
    cache = getattr(layer, "_fused", None)
    if cache is None or cache.key != key:
        cache = layer._fused = FusedCache(key)
    flat = inp if inp.dim() == 2 and inp.is_contiguous() else inp.reshape(rows, in_features).contiguous()
    out = _own_kernel(cache, flat, qweight, scale, bits) if rows <= OWN_KERNEL_ROWS else None
    if out is None and rows <= MAX_FUSED_ROWS[dtype]:
        out = _torch_kernel(cache, flat, qweight, scale, bits)
    if out is None or inp.dim() == 2:
        return out
    return out.reshape(*inp.shape[:-1], qweight.shape[0])


def _own_kernel(cache: FusedCache, flat: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bits: int) -> torch.Tensor | None:
    """glmtune's kernel on the stored tensors, or None where it cannot run (it logs why once)."""
    if not (qweight.dtype == torch.int8 and qweight.is_contiguous() and scale.is_contiguous()) \
            or torch.compiler.is_compiling():  # the ops have no fake kernels for tracing
        return None
    if bits == 4:
        return kernels.int4_linear(flat, qweight, scale)
    if not kernels.features() & kernels.AVX512_VNNI:  # the AVX2 kernel moves activation signs onto the weight
        if cache.int8_full_range is None:
            cache.int8_full_range = bool((qweight == -128).any())
        if cache.int8_full_range:
            _warn_once("an int8 weight holds -128 (THUDM's format stays within +-127), which glmtune's AVX2 int8 "
                       "kernel cannot negate: that layer runs torch's kernel")
            return None
    return kernels.int8_linear(flat, qweight, scale)


def _torch_kernel(cache: FusedCache, flat: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  bits: int) -> torch.Tensor | None:
    """torch's weight-only kernel (its int4 layout made once per weight), or None where it cannot run."""
    rows, in_features = flat.shape
    reason = _unsupported_reason(bits, in_features, flat.dtype)
    if reason is not None:
        _warn_once(reason)
        return None
    if cache.unsupported is not None:
        return None
    try:
        if bits == 8:
            return torch.ops.aten._weight_int8pack_mm(flat, qweight, _scales(cache, scale, 8, in_features, flat.dtype))
        if cache.int4_weight is None:
            cache.int4_weight = _int4_layout(qweight)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, cache.int4_weight, int4_group_size(in_features), _scales(cache, scale, 4, in_features, flat.dtype))
        return out[:, : qweight.shape[0]]
    except RuntimeError as exc:  # a build or CPU without these kernels: remember it for this layer
        cache.unsupported = f"int{bits} kernel failed ({str(exc).splitlines()[0]})"
        _warn_once(cache.unsupported)
        return None
