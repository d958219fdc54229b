"""GGML block quantizers glmtune writes itself (q8_0), bit for bit what ggml's reference writes, faster."""

from __future__ import annotations

import numpy as np
import torch

# ggml's Q8_0: per 32 values, the fp16 scale d = absmax / 127, then int8 roundf(x * (1 / d)) (0 when d == 0).
_Q8_BLOCK, _Q8_BYTES = 32, 34
_Q8_STEP = 4096  # blocks per step: 128 Ki values, so the float32 temporaries stay in a core's L2 cache
# roundf (half away from zero) as trunc(v + copysign(_BELOW_HALF, v)): exact for |v| < 2**23 (here <= 127),
# where adding 0.5 itself would round 0.49999997 up to 1
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def quantize_q8_0(value: torch.Tensor) -> np.ndarray:
    """GGML Q8_0 blocks (rows x cols/32 x 34 bytes) of a 2-D float tensor, bit for bit what ggml's reference
    quantizer (and the gguf package's numpy port) writes, faster: each row range is done by one worker thread
    in single-threaded, cache-sized steps (torch ops release the GIL; no per-op barrier between threads)."""
    from concurrent.futures import ThreadPoolExecutor

    rows, cols = value.shape
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        value = value.to(torch.float32)  # the reference quantizes float32; these three widen to it exactly
    if cols % _Q8_BLOCK:
        raise ValueError(f"Q8_0 needs rows of whole {_Q8_BLOCK}-value blocks, not {cols} values")
    out = torch.empty((rows, cols // _Q8_BLOCK * _Q8_BYTES), dtype=torch.uint8)
    workers = max(1, min(torch.get_num_threads(), rows))
    span = -(-rows // (workers * 4))  # a few spans per worker even out uneven progress
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers are the parallelism (process-wide: export is a command); restored
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda start: _q8_0_rows(value[start:start + span], out[start:start + span]),
                          range(0, rows, span)))
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


def _q8_0_rows(value: torch.Tensor, out: torch.Tensor) -> None:
    blocks, packed = value.reshape(-1, _Q8_BLOCK), out.view(-1, _Q8_BYTES)
    for start in range(0, blocks.shape[0], _Q8_STEP):
        block = blocks[start:start + _Q8_STEP]
        low, high = torch.aminmax(block, dim=1, keepdim=True)
        # the per-block scale and its inverse (1/32 of the values) in numpy, the very float32 operations of the
        # reference: a true division, never a multiply by 1/127
        d = torch.maximum(high, -low).to(torch.float32).numpy() / np.float32(127)
        with np.errstate(divide="ignore"):
            inverse = np.where(d == 0, np.float32(0), np.float32(1) / d)
        scaled = block * torch.from_numpy(inverse)  # float32 (a float16/bfloat16 block is promoted exactly)
        scaled.add_(scaled.sign(), alpha=_BELOW_HALF)
        target = packed[start:start + _Q8_STEP]
        target[:, 2:].copy_(scaled.to(torch.int8).view(torch.uint8))  # float -> int8 truncates toward zero
        target[:, :2].copy_(torch.from_numpy(d.astype(np.float16).view(np.uint8)))
