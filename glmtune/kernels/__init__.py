"""glmtune's own CPU decode kernels: int4 / int8 weight-only and bf16 matrix-vector products for the few rows
of a decode step, where torch's kernels are compute-bound (int4 converts every weight to float; bf16 runs
oneDNN's GEMM). C++ compiled on first use (`build`), loaded as ``torch.ops.glmtune``, run on torch's threads.

int4 / int8 read the checkpoint's own packing (no second copy of the weight) and multiply it by the activations
quantized per call to int8 in blocks of 32 (fp32 scale each, like llama.cpp's q8_0): AVX512-VNNI, or AVX2 on
CPUs without it. bf16 accumulates in fp32 with AVX512-BF16. ``GLMTUNE_CPU_KERNELS=0`` turns them off,
``GLMTUNE_CPU_KERNELS=avx2`` keeps int4 / int8 on the AVX2 path (bf16 then runs torch's kernel). Where the
kernels cannot run (another CPU, no compiler, a failed build) every wrapper returns None after one log warning
saying why, and the caller runs torch's kernel.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.kernels import build

logger = logging.getLogger(__name__)

ENV_SWITCH = "GLMTUNE_CPU_KERNELS"
MAX_ROWS = 4  # rows (batch x sequence) up to which a call is a decode step; more keep torch's GEMMs
# cpu_features() bits, as kernels.h defines them
AVX512_VNNI, AVX512_BF16, AVX2 = 1, 2, 4
_MODES = {"0": "off", "off": "off", "false": "off", "no": "off", "1": "auto", "on": "auto", "true": "auto",
          "yes": "auto", "auto": "auto", "": "auto", "avx2": "avx2"}
_warned: set[str] = set()
_limits: dict[int, int] = {}  # feature mask handed to the library -> the paths it then uses (one entry)


def mode() -> str:
    """'off', 'auto' or 'avx2' from GLMTUNE_CPU_KERNELS (read on every call, so it can change at run time)."""
    raw = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if raw not in _MODES:
        raise InvalidInputError(f"{ENV_SWITCH} must be 0 (off), 1 (auto) or avx2, not {raw!r}", where=ENV_SWITCH)
    return _MODES[raw]


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("glmtune CPU kernels not used: %s; running torch's kernels instead", reason)


def _loaded_features() -> int | None:
    """The usable kernel path bits, or None when switched off or not built (the reason logged once)."""
    current = mode()
    if current == "off":
        return None
    reason = build.load()
    if reason is not None:
        _warn_once(reason)
        return None
    wanted = AVX2 if current == "avx2" else -1
    if wanted not in _limits:  # the library picks its path from these bits too
        _limits.clear()
        _limits[wanted] = int(torch.ops.glmtune.limit_features(wanted))
    return _limits[wanted]


def features() -> int:
    """The kernel paths usable now (AVX512_VNNI | AVX512_BF16 | AVX2 bits); 0 when switched off or not built."""
    return _loaded_features() or 0


def _quantized_path() -> bool:
    available = _loaded_features()
    if available is None:
        return False
    if available & (AVX512_VNNI | AVX2):
        return True
    _warn_once("int4/int8 kernels need AVX512-VNNI or AVX2 with FMA, which this CPU lacks")
    return False


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()


def _shaped(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ dequant(weight)^T + bias for a packed int4 weight [out, in/2] (signed nibbles, element 2j high) and
    per-row scale (fp16 as stored; bf16 / fp32 after a `.to()`); x [..., in] in fp32 / bf16 / fp16, result in
    x's dtype. None when the kernel cannot run."""
    if not _quantized_path():
        return None
    return _shaped(torch.ops.glmtune.int4_linear(_rows(x), weight, scale, bias), x)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ dequant(weight)^T + bias for an int8 weight [out, in] and per-row scale. The AVX2 path needs
    values in [-127, 127] (it moves activation signs onto the weight). None when the kernel cannot run."""
    if not _quantized_path():
        return None
    return _shaped(torch.ops.glmtune.int8_linear(_rows(x), weight, scale, bias), x)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) for bf16 x [..., in] and a contiguous bf16 weight [out, in], accumulated in fp32
    and rounded once. None when the kernel cannot run (no AVX512-BF16, switched off, not built)."""
    available = _loaded_features()
    if available is None:
        return None
    if not available & AVX512_BF16:
        _warn_once("the bf16 kernel needs AVX512-BF16" + (" (GLMTUNE_CPU_KERNELS=avx2)" if mode() == "avx2"
                                                          else ", which this CPU lacks"))
        return None
    return _shaped(torch.ops.glmtune.bf16_linear(_rows(x), weight, bias), x)


def decode_step(x: torch.Tensor) -> bool:
    """Whether `x` is a CPU inference input of at most MAX_ROWS rows (the calls these kernels are for)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and 0 < x.numel() <= MAX_ROWS * x.shape[-1]
            and type(x) is torch.Tensor and not torch.compiler.is_compiling())


def _hooked(layer: nn.Module) -> bool:
    """Whether calling the module runs anything besides nn.Linear's forward: hooks (a user's must still see the
    call) or a replaced forward (accelerate's offloading wraps it)."""
    from torch.nn.modules import module as module_globals

    return bool(layer._forward_hooks or layer._forward_pre_hooks or "forward" in layer.__dict__
                or getattr(module_globals, "_global_forward_hooks", None)
                or getattr(module_globals, "_global_forward_pre_hooks", None))


def decode_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; for a plain bf16 nn.Linear at a decode step, through the bf16 kernel (same result within
    bf16 rounding). Other modules (QuantizedLinear routes itself, LoRA wrappers) are simply called."""
    if (type(layer) is nn.Linear and x.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
            and (layer.bias is None or layer.bias.dtype == torch.bfloat16) and x.shape[-1] == layer.in_features
            and decode_step(x) and layer.weight.device.type == "cpu" and layer.weight.is_contiguous()
            and not _hooked(layer)):
        out = bf16_linear(x, layer.weight, layer.bias)
        if out is not None:
            return out
    return layer(x)
