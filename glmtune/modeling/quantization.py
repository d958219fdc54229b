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

import contextlib
import sys
from collections.abc import Iterable, Iterator

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


# Rows quantized at a time: every temporary stays a few MB, so the allocator reuses memory it already has
# instead of faulting in fresh pages for whole-weight temporaries (that made quantize-at-load 2.4x slower).
QUANTIZE_ROWS = 256

# Round-to-integer by adding 1.5 * 2^(mantissa bits): the sum lands where the format's step is exactly 1, so the
# addition itself rounds half to even, like torch.round, and the sum's bit pattern is bits(magic) + k. Keyed by
# the quotient's dtype: (magic, same-size int, bits(magic), int of a pair of values, bits per value).
_ROUNDING = {torch.float16: (1536.0, torch.int16, 0x6600, torch.int32, 16),
             torch.float32: (12582912.0, torch.int32, 0x4B400000, torch.int64, 32)}


def quantize_weight(weight: torch.Tensor, bits: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, packed for int4; fp16 per-row scale) exactly as the original QuantizedLinear computes them.

    The division happens in the weight's dtype (fp16 for an fp16 model, as the original checkpoints were made),
    or in `dtype` when given (the weight converted first, block by block); an all-zero row gets scale 0 and
    zero weights instead of the original's NaN. Rows are processed `QUANTIZE_ROWS` at a time, each block in
    one sweep (absmax, divide, round, pack) while it is in cache, without float-to-int conversions.
    """
    _check_bits(bits)
    dtype = dtype or weight.dtype
    rows, cols = weight.shape
    if bits == 4 and cols % 2:
        raise InvalidInputError(f"int4 packing needs an even input width, got {cols}")
    quotient = torch.promote_types(dtype, torch.float16)  # the original's `weight / fp16 scale` promotes so
    scale = torch.empty(rows, dtype=torch.float16, device=weight.device)
    qweight = torch.empty(rows, cols // 2 if bits == 4 else cols, dtype=torch.int8, device=weight.device)
    # the bit tricks read bytes in little-endian order; the CPU is where loading quantizes
    fast = quotient in _ROUNDING and dtype.itemsize in _BITS_OF and weight.device.type == "cpu" \
        and sys.byteorder == "little"
    buffers = _Buffers(min(rows, QUANTIZE_ROWS), cols, dtype, quotient, weight.device) if fast else None
    with _one_intra_op_thread(fast):
        for start in range(0, rows, QUANTIZE_ROWS):
            end = min(start + QUANTIZE_ROWS, rows)
            block = weight[start:end].to(dtype)
            if buffers is None or not _quantize_block(block, bits, buffers, qweight[start:end], scale[start:end]):
                qweight[start:end], scale[start:end] = _reference_block(block, bits)
    return qweight, scale


@contextlib.contextmanager
def _one_intra_op_thread(active: bool) -> Iterator[None]:
    """torch's intra-op threads limited to one while blocks are quantized: each op on a cache-sized block is
    too small to split, and when another process holds a core every op waits for the second OpenMP thread
    (quantize-at-load of ChatGLM2-6B at load average 3.5: 52.8 s on two threads, 33.4 s on one, the file
    read 33-35 s). One thread keeps up with the disk; the other core serves page faults and read-ahead."""
    before = torch.get_num_threads()
    if not active or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reference_block(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original formula on a block of rows (already in the compute dtype): packed int8 values, fp16 scales."""
    scale = (block.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)).half()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    values = torch.round(block / safe[:, None]).to(torch.int8)
    return (pack_int4(values) if bits == 4 else values), scale


_BITS_OF = {2: (torch.int16, 0x7FFF), 4: (torch.int32, 0x7FFFFFFF)}  # same-size integer, all but the sign bit


class _Buffers:
    """Scratch tensors for one block of rows, reused by every block of a weight."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, quotient: torch.dtype, device: torch.device) -> None:
        ints, self.mask = _BITS_OF[dtype.itemsize]
        self.magic, self.ints, self.magic_bits, self.pairs, self.width = _ROUNDING[quotient]
        self.magnitude = torch.empty(rows, cols, dtype=ints, device=device)
        self.absmax = torch.empty(rows, dtype=ints, device=device)
        self.quotient = torch.empty(rows, cols, dtype=quotient, device=device)
        self.high = torch.empty(rows, cols // 2, dtype=self.pairs, device=device)


def _quantize_block(block: torch.Tensor, bits: int, buf: _Buffers, qout: torch.Tensor, sout: torch.Tensor) -> bool:
    """The original formula's bits for one block, written into `qout` / `sout`; False (nothing written) for a
    block with an inf or NaN, whose bits the original's float-to-int conversion decides."""
    n = block.shape[0]
    # with the sign bit cleared, finite floats order like their integer bit patterns: an exact abs().amax()
    magnitude = torch.bitwise_and(block.view(buf.magnitude.dtype), buf.mask, out=buf.magnitude[:n])
    absmax = torch.amax(magnitude, dim=-1, out=buf.absmax[:n]).view(block.dtype)
    if not bool(torch.isfinite(absmax).all()):
        return False
    sout.copy_((absmax / (2 ** (bits - 1) - 1)).half())
    safe = torch.where(sout == 0, torch.ones_like(sout), sout)
    quotient = torch.div(block, safe[:, None], out=buf.quotient[:n]).add_(buf.magic)
    if bits == 8:
        qout.copy_(quotient.view(buf.ints).sub_(buf.magic_bits))  # k in [-127, 127]: the int8 cast keeps it
        return True
    # a pair of rounded values as one integer, element 2j in the low half: its low nibble moved to the top and
    # shifted back down sign-extended is 16 * q[2j]; plus q[2j + 1] & 0xF it is the packed byte's value
    pairs = quotient.view(buf.pairs)
    high = torch.bitwise_right_shift(pairs, buf.width, out=buf.high[:n]).bitwise_and_(0xF)
    pairs.bitwise_left_shift_(2 * buf.width - 4).bitwise_right_shift_(2 * buf.width - 8).bitwise_or_(high)
    qout.copy_(pairs)  # values in [-128, 127]: the int8 cast keeps them
    return True


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """Float weight [out, in] in `dtype`: q * scale, rounded once to `dtype` (fp16: the original's values)."""
    _check_bits(bits)
    if qweight.is_cuda:
        fused = cuda_dequantize(qweight, scale, bits, dtype)
        if fused is not None:
            return fused
    # fp16: an fp16 product of exact fp16 operands (the original's); otherwise an fp32 product rounded once.
    # Blocks of rows keep the unpacked and fp32 temporaries small (3x less CPU per call than whole-weight ones,
    # which a training step pays twice per layer).
    compute = torch.float16 if dtype == torch.float16 else torch.float32
    factors = scale.to(compute)[:, None]
    out = torch.empty(qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1), dtype=dtype, device=qweight.device)
    for start in range(0, qweight.shape[0], QUANTIZE_ROWS):
        block = qweight[start:start + QUANTIZE_ROWS]
        values = unpack_int4(block) if bits == 4 else block
        out[start:start + QUANTIZE_ROWS] = values.to(compute) * factors[start:start + QUANTIZE_ROWS]
    return out


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
