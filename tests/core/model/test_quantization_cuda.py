"""The CUDA dequantization path, checked as far as a machine without a GPU allows.

The kernel text is compiled as plain C++ with a shim that runs every (block, thread) of the launch geometry
the Python launcher computes, and its output is compared bit-for-bit with the torch path. When an NVRTC
library is at hand (GLMTUNE_NVRTC_LIB, the `nvidia-cuda-nvrtc-cu12` wheel, or the system one) the same text is
compiled to PTX the way the runtime does it, and assembled with `ptxas` when a CUDA toolkit is installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from testkit import REPO_ROOT

from glmtune.modeling import quantization_cuda
from glmtune.modeling.quantization import dequantize_weight, pack_int4, quantize_weight
from glmtune.modeling.quantization_cuda import (
    KERNEL_NAMES,
    OUT_KINDS,
    compile_ptx,
    cuda_dequantize,
    kernel_source,
    launch_geometry,
)

SHIM = r"""
#include <cstdint>
#define __global__
#define __device__
#define __forceinline__ inline
struct glm_dim3 { unsigned int x, y, z; };
static thread_local glm_dim3 blockIdx, threadIdx, blockDim, gridDim;
"""

DRIVER = r"""
typedef void (*glm_kernel)(const signed char*, const unsigned short*, void*, int, int, int);

extern "C" void glm_launch(int bits, const unsigned int* grid, const unsigned int* block,
                           const signed char* q, const unsigned short* s, void* out, int rows, int cols, int kind) {
    glm_kernel kernel = bits == 4 ? glmtune_dequant_int4 : glmtune_dequant_int8;
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    for (blockIdx.z = 0; blockIdx.z < gridDim.z; ++blockIdx.z)
    for (blockIdx.y = 0; blockIdx.y < gridDim.y; ++blockIdx.y)
    for (blockIdx.x = 0; blockIdx.x < gridDim.x; ++blockIdx.x)
    for (threadIdx.z = 0; threadIdx.z < blockDim.z; ++threadIdx.z)
    for (threadIdx.y = 0; threadIdx.y < blockDim.y; ++threadIdx.y)
    for (threadIdx.x = 0; threadIdx.x < blockDim.x; ++threadIdx.x)
        kernel(q, s, out, rows, cols, kind);
}

extern "C" void glm_round(const float* in, unsigned short* out, long long n, int kind) {
    for (long long i = 0; i < n; ++i) out[i] = kind == 1 ? glm_float_to_bf16_rn(in[i]) : glm_float_to_half_rn(in[i]);
}
"""


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory) -> ctypes.CDLL:
    """The kernel text built as a host shared library (g++), one kernel launch = one loop over the grid."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++/c++) to build the kernel source for the CPU")
    folder = tmp_path_factory.mktemp("cpu_kernels")
    source = folder / "kernels.cpp"
    source.write_text(SHIM + kernel_source() + DRIVER)
    library = folder / "kernels.so"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(library),
                    str(source)], check=True, capture_output=True, text=True, timeout=120)
    lib = ctypes.CDLL(str(library))
    lib.glm_launch.restype = None
    return lib


def run_on_cpu(lib: ctypes.CDLL, qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype,
               max_grid_y: int = quantization_cuda.MAX_GRID_Y) -> torch.Tensor:
    """What `cuda_dequantize` computes, with the launcher's geometry, executed by the CPU build."""
    rows, cols = qweight.shape
    qweight, scale = qweight.contiguous(), scale.half().contiguous()
    out = torch.full((rows, cols * 8 // bits), float("nan"), dtype=dtype)
    grid, block = launch_geometry(rows, cols, max_grid_y)
    lib.glm_launch(ctypes.c_int(bits), (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                   ctypes.c_void_p(qweight.data_ptr()), ctypes.c_void_p(scale.data_ptr()),
                   ctypes.c_void_p(out.data_ptr()), ctypes.c_int(rows), ctypes.c_int(cols),
                   ctypes.c_int(OUT_KINDS[dtype]))
    return out


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit-for-bit equality, except that any NaN matches any NaN (payloads are not part of the contract)."""
    nan = torch.isnan(expected)
    if not torch.equal(torch.isnan(actual), nan):
        return False
    view = torch.int16 if expected.element_size() == 2 else torch.int32
    return torch.equal(actual[~nan].view(view), expected[~nan].view(view))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,width,max_grid_y", [(7, 300, 65535), (13, 514, 4), (1, 2, 65535), (5, 256, 1)])
def test_kernel_source_matches_dequantize_weight_bit_for_bit(cpu_kernels, bits, dtype, rows, width, max_grid_y):
    torch.manual_seed(rows * width + bits)
    weight = torch.randn(rows, width) * torch.logspace(-6, 2, rows)[:, None]
    qweight, scale = quantize_weight(weight.half(), bits)
    actual = run_on_cpu(cpu_kernels, qweight, scale, bits, dtype, max_grid_y)
    assert same_bits(actual, dequantize_weight(qweight, scale, bits, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_int8_value_times_every_fp16_scale_rounds_like_torch(cpu_kernels, dtype):
    # all 65536 fp16 bit patterns (subnormals, overflow to inf, signed zeros, NaN) x all 256 int8 values
    scale = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    qweight = torch.arange(-128, 128, dtype=torch.int8).repeat(scale.numel(), 1)
    actual = run_on_cpu(cpu_kernels, qweight, scale, 8, dtype)
    assert same_bits(actual, dequantize_weight(qweight, scale, 8, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_kernels_float_rounding_is_torchs_round_to_nearest_even(cpu_kernels, dtype):
    # exact ties (also the subnormal ones no int8 x fp16 product reaches), their float neighbours, random bits
    targets = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(dtype)
    targets = targets[torch.isfinite(targets)]
    low, high = targets.float(), torch.nextafter(targets, torch.tensor(float("inf"), dtype=dtype)).float()
    ties = ((low.double() + high.double()) / 2).float()
    ties = ties[torch.isfinite(ties)]
    ones = torch.ones_like(ties)
    generator = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 20,), dtype=torch.int64, generator=generator)
    values = torch.cat([ties, torch.nextafter(ties, ones * float("inf")), torch.nextafter(ties, -ones * float("inf")),
                        -ties, random_bits.to(torch.int32).view(torch.float32)]).contiguous()
    out = torch.empty(values.shape, dtype=dtype)
    cpu_kernels.glm_round(ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                          ctypes.c_longlong(values.numel()), ctypes.c_int(OUT_KINDS[dtype]))
    assert same_bits(out, values.to(dtype))


def test_every_int4_byte_unpacks_high_nibble_first_with_sign(cpu_kernels):
    every_byte = torch.arange(-128, 128, dtype=torch.int8)[None]
    scale = torch.tensor([1.0], dtype=torch.float16)
    pairs = run_on_cpu(cpu_kernels, every_byte, scale, 4, torch.float32).reshape(-1, 2).to(torch.int8)
    assert torch.equal(pack_int4(pairs.reshape(1, -1)), every_byte)
    assert pairs.min() == -8 and pairs.max() == 7


def test_geometry_covers_every_stored_column_once_and_strides_rows():
    assert launch_geometry(7, 300) == ((2, 7, 1), (256, 1, 1))
    assert launch_geometry(100_000, 256) == ((1, 65535, 1), (256, 1, 1))
    assert launch_geometry(3, 1)[0][0] == 1 and launch_geometry(3, 257)[0][0] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_launcher_passes_geometry_and_arguments_in_the_kernels_order(cpu_kernels, bits, dtype):
    qweight, scale = quantize_weight(torch.randn(9, 600).half(), bits)
    launched = []

    def kernel_function(grid, block, shared_bytes, stream, params):  # stands in for cpm_kernels' KernelFunction
        launched.append((grid, block, shared_bytes, stream))
        cpu_kernels.glm_launch(ctypes.c_int(bits), (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), *params)

    out = quantization_cuda._launch(kernel_function, qweight, scale.float(), bits, dtype, stream=1234)
    assert launched == [(*launch_geometry(*qweight.shape), 0, 1234)]
    assert same_bits(out, dequantize_weight(qweight, scale, bits, dtype))


class FakeCpmKernels:
    """Just enough of cpm_kernels (nvrtc binding, LazyKernelCModule, KernelFunction) to drive `_build`."""

    def __init__(self, monkeypatch, nvrtc_version=(12, 9), compile_error=None, load_error=None) -> None:
        self.options: list[str] = []
        self.loaded: list[bytes] = []
        fake = self

        class Nvrtc:
            version = nvrtc_version

            def nvrtcCreateProgram(self, program, source, name, count, headers, names):  # noqa: N802
                assert source == kernel_source() and count == 0

            def nvrtcCompileProgram(self, program, count, options):  # noqa: N802
                fake.options = list(options)
                if compile_error:
                    raise RuntimeError(compile_error)

            def nvrtcGetPTXSize(self, program):  # noqa: N802
                return 4

            def nvrtcGetPTX(self, program, buffer):  # noqa: N802
                buffer.value = b"PTX"

            def nvrtcDestroyProgram(self, program):  # noqa: N802
                pass

        class LazyKernelCModule:
            def __init__(self, code: bytes) -> None:
                fake.loaded.append(code)

            def get_module(self) -> None:
                if load_error:
                    raise RuntimeError(load_error)

        base = types.SimpleNamespace(LazyKernelCModule=LazyKernelCModule,
                                     KernelFunction=lambda module, name: ("function", name))
        library = types.SimpleNamespace(nvrtc=Nvrtc())
        for name, module in {"cpm_kernels": types.SimpleNamespace(), "cpm_kernels.kernels": types.SimpleNamespace(),
                             "cpm_kernels.kernels.base": base, "cpm_kernels.library": library}.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: [(9, 0), (8, 6)][index])


def test_build_compiles_once_for_the_oldest_gpu_and_loads_both_kernels(monkeypatch):
    monkeypatch.delenv("GLMTUNE_CUDA_KERNELS", raising=False)
    fake = FakeCpmKernels(monkeypatch)
    built = quantization_cuda._build()
    assert isinstance(built, quantization_cuda._Kernels) and built.capability == (8, 6)
    assert built.functions == {8: ("function", "glmtune_dequant_int8"), 4: ("function", "glmtune_dequant_int4")}
    assert "--gpu-architecture=compute_86" in fake.options and "--ftz=false" in fake.options
    assert fake.loaded == [b"PTX\0"]


@pytest.mark.parametrize("failure,reason", [
    ({"nvrtc_version": (0, 0)}, "no NVRTC 11+ library"),
    ({"compile_error": "NVRTC Error: bad"}, "compute_86 failed: NVRTC Error: bad"),
    ({"load_error": "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"}, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"),
])
def test_build_explains_why_it_falls_back(monkeypatch, failure, reason):
    monkeypatch.delenv("GLMTUNE_CUDA_KERNELS", raising=False)
    FakeCpmKernels(monkeypatch, **failure)
    assert reason in quantization_cuda._build()


def test_a_cpm_kernels_that_fails_to_import_means_the_torch_path(monkeypatch, tmp_path):
    # cpm_kernels 1.0.11 calls the CUDA runtime and pkg_resources while importing; either can raise
    (tmp_path / "cpm_kernels").mkdir()
    (tmp_path / "cpm_kernels" / "__init__.py").write_text("raise RuntimeError('CUDA Error: no CUDA driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cpm_kernels", raising=False)
    monkeypatch.delenv("GLMTUNE_CUDA_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = quantization_cuda._build()
    assert reason.startswith("cpm_kernels is not usable (RuntimeError: CUDA Error: no CUDA driver)")


def test_cpu_tensors_and_unusual_inputs_take_the_torch_path():
    qweight, scale = quantize_weight(torch.randn(4, 8), 4)
    assert cuda_dequantize(qweight, scale, 4, torch.float16) is None
    assert cuda_dequantize(qweight, scale, 4, torch.float64) is None
    assert cuda_dequantize(qweight.float(), scale, 4, torch.float16) is None


def test_the_decision_is_made_once_logged_once_and_needs_no_cpm_kernels(monkeypatch, caplog):
    monkeypatch.setattr(quantization_cuda, "_decided", False)
    monkeypatch.setattr(quantization_cuda, "_kernels", None)
    monkeypatch.setenv("GLMTUNE_CUDA_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger=quantization_cuda.__name__):
        assert quantization_cuda._get_kernels() is None
        assert quantization_cuda._get_kernels() is None
    assert [r.getMessage() for r in caplog.records] == [
        "int8/int4 weights dequantize with the torch path: disabled by GLMTUNE_CUDA_KERNELS=0"
    ]
    monkeypatch.setattr(quantization_cuda, "_decided", False)
    monkeypatch.delenv("GLMTUNE_CUDA_KERNELS")
    if not torch.cuda.is_available():
        assert "no usable CUDA device" in quantization_cuda._build()
    assert "cpm_kernels" not in sys.modules


def test_quantized_model_forward_and_backward_on_cpu_never_import_cpm_kernels():
    script = """
import sys, torch
from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.modeling.quantization import QuantizedLinear
config = ChatGLMConfig(vocab_size=128, hidden_size=32, num_layers=1, num_attention_heads=2, inner_hidden_size=64,
                       bos_token_id=104, eos_token_id=105, mask_token_id=100, gmask_token_id=101, pad_token_id=3)
model = ChatGLMForConditionalGeneration(config).quantize(4)
assert any(isinstance(m, QuantizedLinear) for m in model.modules())
ids = torch.randint(5, 100, (1, 8)); ids[0, 5], ids[0, 6] = 101, 104
embeddings = model.transformer.word_embeddings
embeddings.weight.requires_grad_(True)
model(ids).logits.float().sum().backward()
assert embeddings.weight.grad is not None
print(sorted(m for m in sys.modules if m.startswith("cpm_kernels")))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def find_nvrtc() -> str | None:
    """An NVRTC shared library: $GLMTUNE_NVRTC_LIB, the pip wheel's, or one the system linker knows."""
    if os.environ.get("GLMTUNE_NVRTC_LIB"):
        return os.environ["GLMTUNE_NVRTC_LIB"]
    try:
        import nvidia.cuda_nvrtc as wheel  # the nvidia-cuda-nvrtc-cu12 wheel, when installed
        found = sorted(glob.glob(str(Path(next(iter(wheel.__path__))) / "lib" / "libnvrtc.so*")))
        if found:
            return found[0]
    except ImportError:
        pass
    return ctypes.util.find_library("nvrtc")


class CtypesNvrtc:
    """The five NVRTC calls `compile_ptx` makes, with cpm_kernels.library.nvrtc's Python signatures."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)

    def _check(self, status: int, program: ctypes.c_void_p | None = None) -> None:
        if status != 0:
            log = b""
            if program is not None:
                size = ctypes.c_size_t()
                self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
                buffer = ctypes.create_string_buffer(size.value)
                self.lib.nvrtcGetProgramLog(program, buffer)
                log = buffer.value
            raise RuntimeError(f"NVRTC error {status}: {log.decode()}")

    def nvrtcCreateProgram(self, program, source, name, count, headers, names):  # noqa: N802
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(),
                                                count, None, None))

    def nvrtcCompileProgram(self, program, count, options):  # noqa: N802
        array = (ctypes.c_char_p * count)(*(option.encode() for option in options))
        self._check(self.lib.nvrtcCompileProgram(program, count, array), program)

    def nvrtcGetPTXSize(self, program) -> int:  # noqa: N802
        size = ctypes.c_size_t()
        self._check(self.lib.nvrtcGetPTXSize(program, ctypes.byref(size)))
        return size.value

    def nvrtcGetPTX(self, program, buffer):  # noqa: N802
        self._check(self.lib.nvrtcGetPTX(program, buffer))

    def nvrtcDestroyProgram(self, program):  # noqa: N802
        self._check(self.lib.nvrtcDestroyProgram(ctypes.byref(program)))


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (9, 0)])
def test_nvrtc_compiles_the_source_to_ptx_that_ptxas_accepts(tmp_path, capability):
    path = find_nvrtc()
    if path is None:
        pytest.skip("no NVRTC library (set GLMTUNE_NVRTC_LIB or install nvidia-cuda-nvrtc-cu12)")
    ptx = compile_ptx(CtypesNvrtc(path), capability)
    assert ptx.endswith(b"\0")
    text = ptx.rstrip(b"\0").decode()
    major, minor = capability
    assert f".target sm_{major}{minor}" in text
    for name in KERNEL_NAMES.values():
        assert f".entry {name}(" in text
    ptxas = shutil.which("ptxas") or shutil.which("/usr/local/cuda/bin/ptxas")
    if ptxas is None:
        return
    (tmp_path / "k.ptx").write_bytes(ptx.rstrip(b"\0"))
    done = subprocess.run([ptxas, f"-arch=sm_{major}{minor}", "-o", str(tmp_path / "k.cubin"),
                           str(tmp_path / "k.ptx")], capture_output=True, text=True, timeout=120)
    unsupported = "not defined for option 'gpu-name'" in done.stderr or "Unsupported .version" in done.stderr
    assert done.returncode == 0 or unsupported, done.stderr
