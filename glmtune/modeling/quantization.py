"""Weight-only int8 / int4 quantization in the layout of THUDM's chatglm-6b-int4 / -int8 checkpoints.

Per output row: scale = absmax(row) / (2^(bits-1) - 1), stored float16; weight = round(w / scale) as int8.
Int4 packs two values per byte, `(w[2j] << 4) | (w[2j+1] & 0xF)`, unpacked with sign extension. A
`QuantizedLinear` keeps `weight` (int8, [out, in] or packed [out, in/2]), `weight_scale` (fp16 [out]) and
`bias`, so a pre-quantized state dict loads directly. CPU inference with grad disabled and few rows
(decoding) runs torch's fused weight-only kernels (`quantization_cpu`; `GLMTUNE_FUSED_QUANT=0` turns them
off). Otherwise forward dequantizes to the activation dtype and runs a plain matmul; backward recomputes
the dequantized weight instead of keeping it alive (the frozen int weights get no gradient). On CUDA
tensors the dequantization first tries glmtune's own NVRTC-compiled kernels (`quantization_cuda`, through
cpm_kernels like the original; `GLMTUNE_CUDA_KERNELS=0` turns them off); the pure-torch form runs on any
device and gives the same bits (an fp16 product of exact fp16 operands).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.modeling.quantization_cpu import FusedCache, fused_forward
from glmtune.modeling.quantization_cuda import cuda_dequantize

SUPPORTED_BITS = (4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InvalidInputError(f"quantization bits must be 4 or 8, not {bits!r}", where="quantization_bit")


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [out, in] (in even) into [out, in/2] bytes, element 2j high."""
    if values.shape[-1] % 2:
        raise InvalidInputError(f"int4 packing needs an even input width, got {values.shape[-1]}")
    return (values[..., 0::2] << 4) | (values[..., 1::2] & 0xF)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [out, n] bytes -> [out, 2n] int8, both nibbles sign-extended."""
    high = packed >> 4
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).flatten(-2)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, packed for int4; fp16 per-row scale) exactly as the original QuantizedLinear computes them.

    The division happens in the weight's dtype (fp16 for an fp16 model, as the original checkpoints were made);
    an all-zero row gets scale 0 and zero weights instead of the original's NaN.
    """
    _check_bits(bits)
    scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    values = torch.round(weight / safe[:, None]).to(torch.int8)
    if bits == 4:
        values = pack_int4(values)
    return values, scale


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Float weight [out, in] in `dtype`: q * scale, rounded once to `dtype` (fp16: the original's values)."""
    _check_bits(bits)
    if qweight.is_cuda:
        fused = cuda_dequantize(qweight, scale, bits, dtype)
        if fused is not None:
            return fused
    values = unpack_int4(qweight) if bits == 4 else qweight
    if dtype == torch.float16:
        return values.to(torch.float16) * scale.to(torch.float16)[:, None]
    return (values.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x @ dequant(W)^T; the backward dequantizes again rather than saving a float copy of W."""

    @staticmethod
    def forward(ctx, inp: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.save_for_backward(qweight, scale)
        ctx.bits = bits
        return F.linear(inp, dequantize_weight(qweight, scale, bits, inp.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        qweight, scale = ctx.saved_tensors
        grad_input = grad_output @ dequantize_weight(qweight, scale, ctx.bits, grad_output.dtype)
        return grad_input, None, None, None


class QuantizedLinear(nn.Module):
    """Weight-only quantized Linear with the state-dict keys `weight`, `weight_scale`, `bias` of chatglm-6b-int4."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_bits(bits)
        if bits == 4 and in_features % 2:
            raise InvalidInputError(f"int4 packing needs an even input width, got {in_features}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        packed = in_features * bits // 8
        self.weight = nn.Parameter(
            torch.zeros(out_features, packed, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.zeros(out_features, dtype=torch.float16, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        )
        # kernel-layout copies derived from weight/weight_scale for CPU decoding; not state, never saved
        self._fused: FusedCache | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """Quantize an existing Linear's weights (bias kept in its dtype, frozen like the original)."""
        layer = cls(linear.in_features, linear.out_features, bits, linear.bias is not None, linear.weight.device)
        qweight, scale = quantize_weight(linear.weight.detach(), bits)
        layer.weight.data, layer.weight_scale.data = qweight, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        out = fused_forward(self, inp)
        if out is None:
            out = _DequantLinear.apply(inp, self.weight, self.weight_scale, self.bits)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave the derived kernel cache behind (it is rebuilt on the next call)."""
        state = super().__getstate__()
        return {**state, "_fused": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def quantize_model(
    model: nn.Module, bits: int, module_names: Iterable[str], empty_init: bool = False
) -> int:
    """Replace every nn.Linear whose qualified name ends with one of `module_names` (dot-separated suffixes,
    e.g. "attention.query_key_value") by a QuantizedLinear, in place; returns how many were replaced.

    `empty_init` builds zero-filled layers to receive a pre-quantized state dict instead of quantizing.
    """
    _check_bits(bits)
    suffixes = tuple(module_names)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if empty_init:
            layer = QuantizedLinear(
                linear.in_features, linear.out_features, bits, linear.bias is not None, linear.weight.device
            )
        else:
            layer = QuantizedLinear.from_linear(linear, bits)
        setattr(parent, child, layer)
    return len(targets)
