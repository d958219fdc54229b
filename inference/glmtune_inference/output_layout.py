"""The vocabulary projection in a decode-friendly layout: on CPU with fp32 weights, `hidden @ W.T` with `W.T`
stored contiguous ([hidden, vocab]) runs about twice as fast as `F.linear(hidden, W)` for the few rows a
decode step has (MKL picks a single-threaded kernel for the latter), with the same result to float rounding.

The swap happens once after loading, over every served module tree together, so trees that shared the
output weight share the transposed one. A tied input embedding (ChatGLM-6B) reads the same transposed
storage, so the weight is still held once. Checkpoints are memory-mapped: the original's pages would stay
resident in the file mapping (which the other weights keep open), so they are handed back to the kernel.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable

import torch
from torch import nn

OUTPUT_LAYOUTS = ("auto", "standard")
_COPY_BLOCK_BYTES = 16 << 20


class TransposedLinear(nn.Module):
    """`hidden @ weight_t (+ bias)` with `weight_t` [in, out] contiguous: the same map as nn.Linear."""

    def __init__(self, weight_t: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight_t = weight_t
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] view nn.Linear would hold (for code that reads `.weight`; no copy)."""
        return self.weight_t.t()

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Fold the leading dims into rows so one plain matrix product runs.
        out = hidden.reshape(-1, hidden.shape[-1]) @ self.weight_t
        if self.bias is not None:
            out = out + self.bias
        return out.view(*hidden.shape[:-1], out.shape[-1])


class TransposedEmbedding(nn.Module):
    """Embedding lookup from a [dim, vocab] table (the tied output weight_t), gathering columns."""

    def __init__(self, weight_t: nn.Parameter) -> None:
        super().__init__()
        self.weight_t = weight_t

    @property
    def weight(self) -> torch.Tensor:
        """The [vocab, dim] view nn.Embedding would hold (no copy)."""
        return self.weight_t.t()

    @property
    def num_embeddings(self) -> int:
        return self.weight_t.shape[1]

    @property
    def embedding_dim(self) -> int:
        return self.weight_t.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_t.index_select(1, input_ids.reshape(-1)).t()
        return rows.reshape(*input_ids.shape, self.weight_t.shape[0])


def wants_transposed(layout: str, weight: torch.Tensor) -> bool:
    """`auto` transposes fp32 CPU weights only: bf16/fp16 matmuls are slower transposed on CPU (measured)."""
    return layout == "auto" and weight.device.type == "cpu" and weight.dtype == torch.float32


def apply_output_layout(models: Iterable[nn.Module], layout: str) -> int:
    """Swap each model's output projection (and a tied embedding) for the transposed modules, in place.

    Trees whose weights share storage get the same transposed parameter. Returns how many trees changed.
    """
    if layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"output layout must be one of {OUTPUT_LAYOUTS}, got {layout!r}")
    transposed: dict[tuple, tuple[torch.Tensor, nn.Parameter]] = {}
    changed = 0
    seen: set[int] = set()
    for model in models:
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        if id(model) in seen:
            continue
        seen.add(id(model))
        output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if type(output) is not nn.Linear or not wants_transposed(layout, output.weight):
            continue
        weight_t = _transposed(output.weight, transposed)
        tied = type(embedding) is nn.Embedding and _same_tensor(embedding.weight, output.weight)
        model.set_output_embeddings(TransposedLinear(weight_t, output.bias))
        if tied:
            model.set_input_embeddings(TransposedEmbedding(weight_t))
        changed += 1
    for original, _ in transposed.values():
        release_mapped_pages(original)
    return changed


def release_mapped_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages that lie wholly inside `tensor` when it sits in a file mapping (Linux only).

    For a memory-mapped checkpoint the pages are re-read from the file if ever touched again, so the values
    stay those loaded; anonymous memory is left alone (it goes back when the tensor is freed). Returns bytes
    released.
    """
    if sys.platform != "linux" or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not _in_file_mapping(start, end):
        return 0
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if libc.madvise(first, last - first, mmap.MADV_DONTNEED) != 0:
        return 0
    return last - first


def _in_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one private mapping of a regular file (per /proc/self/maps)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= start < high:
                inode, path = fields[4], fields[5] if len(fields) > 5 else ""
                return end <= high and fields[1].endswith("p") and inode != "0" and path.startswith("/")
    return False


def _key(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _key(a) == _key(b)


def _transposed(weight: torch.Tensor, memo: dict[tuple, tuple[torch.Tensor, nn.Parameter]]) -> nn.Parameter:
    """One contiguous [in, out] parameter per distinct weight storage (the memo keeps each original alive
    until the swap ends, so a freed address cannot be mistaken for a shared one)."""
    key = _key(weight)
    if key not in memo:
        source = weight.detach()
        weight_t = torch.empty(source.shape[1], source.shape[0], dtype=source.dtype, device=source.device)
        # Row blocks, each block's mapped pages released once copied: the load never holds both copies.
        step = max(1, _COPY_BLOCK_BYTES // max(1, source.shape[1] * source.element_size()))
        for row in range(0, source.shape[0], step):
            weight_t[:, row : row + step].copy_(source[row : row + step].t())
            release_mapped_pages(source[row : row + step])
        memo[key] = weight, nn.Parameter(weight_t, requires_grad=weight.requires_grad)
    return memo[key][1]
