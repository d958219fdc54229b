"""CUDA kernels that dequantize int8 / packed-int4 weights, compiled at run time with NVRTC via cpm_kernels.

`cuda_dequantize` gives the same bits as `quantization.dequantize_weight` (q * fp16 scale, exact in float,
rounded once to fp16 / bf16, or kept as fp32) but in one pass on the GPU instead of four torch kernels.
The kernels are our own CUDA C (`kernel_source()`): no headers, no intrinsics, the fp16/bf16 rounding done
with integer bit operations, so the same text also compiles as plain C++ and is checked on a CPU.

Everything here is lazy: importing this module imports neither cpm_kernels nor NVRTC. The first call with a
CUDA tensor decides once per process whether the kernels can run (CUDA present, cpm_kernels importable,
NVRTC found, the source compiles for the lowest compute capability among the visible GPUs, the driver loads
the PTX); if not, it logs one INFO line with the reason and every later call returns None, which sends
`dequantize_weight` down its pure-torch path. Set `GLMTUNE_CUDA_KERNELS=0` to force the torch path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "GLMTUNE_CUDA_KERNELS"
BLOCK_SIZE = 256
MAX_GRID_Y = 65535
KERNEL_NAMES = {8: "glmtune_dequant_int8", 4: "glmtune_dequant_int4"}
OUT_KINDS = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_INT32_MAX = 2**31 - 1

_SOURCE = r"""
// glmtune weight dequantization: out[r, c] = q[r, c] * scale[r], rounded once to the output type.
// Launch: blockDim = (BLOCK, 1, 1); gridDim.x covers the stored (packed) columns, gridDim.y strides rows.

union glm_bits32 { float f; unsigned int u; };

__device__ __forceinline__ float glm_half_to_float(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    unsigned int exponent = ((unsigned int)h >> 10) & 0x1Fu;
    unsigned int mantissa = (unsigned int)h & 0x3FFu;
    glm_bits32 v;
    if (exponent == 0x1Fu) {
        v.u = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0u) {
        v.u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else {
        v.f = (float)mantissa * 5.9604644775390625e-8f;  // subnormal: mantissa * 2^-24, exact
        v.u |= sign;
    }
    return v.f;
}

__device__ __forceinline__ unsigned short glm_float_to_half_rn(float f) {
    glm_bits32 v;
    v.f = f;
    unsigned int sign = (v.u >> 16) & 0x8000u;
    unsigned int mag = v.u & 0x7FFFFFFFu;
    if (mag > 0x7F800000u) return (unsigned short)(sign | 0x7E00u);  // NaN
    if (mag >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);  // rounds past 65504: inf
    if (mag >= 0x38800000u) {  // normal half: rebias the exponent, round the 13 dropped bits to even
        unsigned int r = mag - 0x38000000u;
        r += 0x0FFFu + ((r >> 13) & 1u);
        return (unsigned short)(sign | (r >> 13));
    }
    if (mag <= 0x33000000u) return (unsigned short)sign;  // at most 2^-25: rounds to (signed) zero
    unsigned int shift = 126u - (mag >> 23);  // subnormal half: count units of 2^-24
    unsigned int significand = (mag & 0x7FFFFFu) | 0x800000u;
    unsigned int units = significand >> shift;
    unsigned int rest = significand & ((1u << shift) - 1u);
    unsigned int halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (units & 1u))) units += 1u;
    return (unsigned short)(sign | units);
}

__device__ __forceinline__ unsigned short glm_float_to_bf16_rn(float f) {
    glm_bits32 v;
    v.f = f;
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)0x7FC0u;  // NaN
    return (unsigned short)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

// kind 0: fp16, 1: bf16, 2: fp32. Both operands are exact in float (|q| <= 128, fp16 scale) and so is
// their product (<= 8 + 11 significant bits), hence one rounding, as torch's fp16 multiply does.
__device__ __forceinline__ void glm_store(void* out, long long index, int kind, float value) {
    if (kind == 2) {
        ((float*)out)[index] = value;
    } else if (kind == 1) {
        ((unsigned short*)out)[index] = glm_float_to_bf16_rn(value);
    } else {
        ((unsigned short*)out)[index] = glm_float_to_half_rn(value);
    }
}

extern "C" __global__ void glmtune_dequant_int8(const signed char* __restrict__ qweight,
                                               const unsigned short* __restrict__ scale, void* out,
                                               int rows, int cols, int kind) {
    long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        float s = glm_half_to_float(scale[row]);
        long long index = row * cols + col;
        glm_store(out, index, kind, (float)qweight[index] * s);
    }
}

// cols counts packed bytes; byte j of a row holds element 2j in its high nibble and 2j+1 in its low one.
extern "C" __global__ void glmtune_dequant_int4(const signed char* __restrict__ qweight,
                                               const unsigned short* __restrict__ scale, void* out,
                                               int rows, int cols, int kind) {
    long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
        float s = glm_half_to_float(scale[row]);
        long long index = row * cols + col;
        int byte = (int)(unsigned char)qweight[index];
        int high = ((byte >> 4) ^ 8) - 8;
        int low = ((byte & 0xF) ^ 8) - 8;
        glm_store(out, 2 * index, kind, (float)high * s);
        glm_store(out, 2 * index + 1, kind, (float)low * s);
    }
}
"""


def kernel_source() -> str:
    """The CUDA C text of both kernels (self-contained: compiles under NVRTC, nvcc, or g++ with a shim)."""
    return _SOURCE


def launch_geometry(
    rows: int, cols: int, max_grid_y: int = MAX_GRID_Y
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) for a [rows, cols] stored weight: one thread per stored column, rows strided over grid y."""
    grid = ((cols + BLOCK_SIZE - 1) // BLOCK_SIZE, min(rows, max_grid_y), 1)
    return grid, (BLOCK_SIZE, 1, 1)


def nvrtc_options(capability: tuple[int, int]) -> list[str]:
    """NVRTC flags: PTX for `capability` (major, minor) with IEEE float semantics (no fast math, no ftz)."""
    major, minor = capability
    return [f"--gpu-architecture=compute_{major}{minor}", "--ftz=false", "--fmad=false"]


def compile_ptx(nvrtc: Any, capability: tuple[int, int]) -> bytes:
    """PTX (NUL-terminated, as cuModuleLoadData wants) of `kernel_source()` through a cpm_kernels-style
    NVRTC binding (`cpm_kernels.library.nvrtc`); raises RuntimeError with NVRTC's log on failure."""
    program = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(program, _SOURCE, "glmtune_dequant.cu", 0, [], [])
    try:
        options = nvrtc_options(capability)
        nvrtc.nvrtcCompileProgram(program, len(options), options)
        buffer = ctypes.create_string_buffer(nvrtc.nvrtcGetPTXSize(program))
        nvrtc.nvrtcGetPTX(program, buffer)
        return buffer.raw
    finally:
        nvrtc.nvrtcDestroyProgram(program)


@dataclass
class _Kernels:
    """The loaded module's functions (cpm_kernels KernelFunction, one per bit width) and what built them."""

    functions: dict[int, Any]
    capability: tuple[int, int]


_lock = threading.Lock()
_decided = False
_kernels: _Kernels | None = None


def _lowest_capability() -> tuple[int, int]:
    """PTX for the oldest visible GPU also JIT-compiles for every newer one."""
    return min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def _build() -> _Kernels | str:
    """The kernels, or the reason the torch path is used instead."""
    if os.environ.get(ENV_SWITCH, "").strip() == "0":
        return f"disabled by {ENV_SWITCH}=0"
    if not torch.cuda.is_available():
        return "torch reports no usable CUDA device"
    try:
        from cpm_kernels.kernels.base import KernelFunction, LazyKernelCModule
        from cpm_kernels.library import nvrtc
    except Exception as exc:  # cpm_kernels probes the driver and pkg_resources at import; any failure is "absent"
        return f"cpm_kernels is not usable ({type(exc).__name__}: {exc}); install glmtune[cuda]"
    if tuple(nvrtc.version) < (11, 0):
        return "cpm_kernels found no NVRTC 11+ library (it looks in $CUDA_PATH/lib64 and /usr/local/cuda/lib64)"
    capability = _lowest_capability()
    try:
        ptx = compile_ptx(nvrtc, capability)
        module = LazyKernelCModule(ptx)
        module.get_module()  # load now, so a driver too old for this PTX is caught here and not mid-forward
    except Exception as exc:  # NVRTC or driver errors arrive as RuntimeError from cpm_kernels
        return f"building the kernels for compute_{capability[0]}{capability[1]} failed: {exc}"
    functions = {bits: KernelFunction(module, name) for bits, name in KERNEL_NAMES.items()}
    return _Kernels(functions, capability)


def _get_kernels() -> _Kernels | None:
    """Decide once per process (thread-safe) whether the CUDA kernels are usable; log why not, once."""
    global _decided, _kernels
    if _decided:
        return _kernels
    with _lock:
        if not _decided:
            built = _build()
            if isinstance(built, str):
                logger.info("int8/int4 weights dequantize with the torch path: %s", built)
            else:
                logger.debug("int8/int4 weights dequantize with glmtune's CUDA kernels (compute_%d%d)",
                             *built.capability)
                _kernels = built
            _decided = True
    return _kernels


def _servable(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> bool:
    """Shapes and dtypes the kernels handle; anything else goes to the torch path (and its own errors)."""
    return (
        bits in KERNEL_NAMES
        and dtype in OUT_KINDS
        and qweight.dtype == torch.int8
        and qweight.dim() == 2
        and scale.shape == qweight.shape[:1]
        and max(qweight.shape) <= _INT32_MAX  # the kernels take int sizes (indices are 64-bit inside)
    )


def _launch(function: Any, qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype,
            stream: int) -> torch.Tensor:
    """Allocate the output beside `qweight` and launch `function` (a cpm_kernels KernelFunction) on `stream`."""
    rows, cols = qweight.shape
    out = torch.empty(rows, cols * 8 // bits, dtype=dtype, device=qweight.device)
    if out.numel() == 0:
        return out
    qweight = qweight.contiguous()
    scale = scale.to(device=qweight.device, dtype=torch.float16).contiguous()
    grid, block = launch_geometry(rows, cols)
    params = [
        ctypes.c_void_p(qweight.data_ptr()),
        ctypes.c_void_p(scale.data_ptr()),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_int32(rows),
        ctypes.c_int32(cols),
        ctypes.c_int32(OUT_KINDS[dtype]),
    ]
    function(grid, block, 0, stream, params)
    return out


def cuda_dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """[out, in] `dtype` weight from int8 (or packed int4) `qweight` and per-row fp16 `scale`, computed on
    the GPU; None when the kernels cannot serve this call (not CUDA, unavailable, or an unusual input)."""
    if not qweight.is_cuda or not _servable(qweight, scale, bits, dtype):
        return None
    kernels = _get_kernels()
    if kernels is None:
        return None
    with torch.cuda.device(qweight.device):
        stream = torch.cuda.current_stream().cuda_stream
        return _launch(kernels.functions[bits], qweight, scale, bits, dtype, stream)
