"""The heavy steps of the prepared device check (bench/gpu_check.sh runs this after the `gpu` tests).

On a GPU, with a ChatGLM-6B-shaped model of random weights built on the device (nothing is downloaded):
  2. our int8/int4 dequantization kernels at ChatGLM-6B shapes: bit-identical to torch's dequantization, and
     their speed against it;
  3. peak GPU memory of one LoRA r8 step (batch 1 x 128 tokens) on fp16, int8 and int4 bases and of one ptv2
     (pre_seq_len 128) step on int4, beside the on-paper figures computed here;
  4. LoRA bf16 training at 2048 packed tokens: tokens/s and MFU against the bf16 GEMM peak measured in the run;
  5. serving (fp16 and int4) through the batching engine: batch-1 decode tokens/s, 32 concurrent streams'
     aggregate tokens/s, TTFT p50/p95.
`--size tiny --device cpu` runs the same steps on a tiny model on the CPU (the smoke mode: numbers are
recorded as smoke, targets are not checked). The table is appended to bench/RESULTS.md (bench/results.py).

    python bench/gpu_check.py --device cuda --size 6b --tests "12 passed" --tests-rc 0
    python bench/gpu_check.py --device cpu --size tiny --results /tmp/RESULTS.md     # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (bench/results.py, beside this file)

GIB = 1024**3
# name: (layers, hidden, heads, inner, vocab); 6b is ChatGLM-6B itself, tiny the tests' tiny v1 model.
SIZES = {"6b": (28, 4096, 32, 16384, 130528), "tiny": (2, 64, 4, 256, 130528)}
KERNEL_SHAPES = {"6b": [(4096, 4096), (16384, 4096), (4096, 16384)], "tiny": [(256, 256), (1024, 256), (256, 1024)]}
WORKLOAD = {"6b": {"mem_tokens": 128, "pre_seq_len": 128, "train_tokens": 2048, "train_steps": 5,
                   "prompt": 128, "decode": 128, "streams": 32},
            "tiny": {"mem_tokens": 32, "pre_seq_len": 8, "train_tokens": 128, "train_steps": 2,
                     "prompt": 16, "decode": 8, "streams": 4}}
TARGETS = {"lora-int4 GiB": 6.0, "ptv2-int4 GB": 6.7, "MFU": 0.45, "streams/batch-1": 12.0}


def config(size: str, **overrides: Any) -> Any:
    """A ChatGLM-6B config of `size` with the published special token ids."""
    from glmtune.modeling.chatglm6b import ChatGLMConfig

    layers, hidden, heads, inner, vocab = SIZES[size]
    return ChatGLMConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, inner_hidden_size=inner,
                         vocab_size=vocab, max_sequence_length=4096, bos_token_id=130004, eos_token_id=130005,
                         pad_token_id=3, mask_token_id=130000, gmask_token_id=130001, **overrides)


def build(size: str, device: torch.device, dtype: torch.dtype, bits: int = 0, **overrides: Any) -> torch.nn.Module:
    """Random weights made directly on `device` in `dtype` (no fp32 copy, no host transfer), then quantized."""
    from glmtune.modeling.chatglm6b import ChatGLMForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = ChatGLMForConditionalGeneration(config(size, **overrides))
    finally:
        torch.set_default_dtype(previous)
    if bits:
        model.quantize(bits)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- 2. kernels ---------------------------------------------------------------------------------------------

def check_kernels(size: str, device: torch.device) -> list[str]:
    """Rows: shape, bits, dtype, bit-identical?, kernel ms, torch ms, speed-up."""
    from glmtune.modeling.quantization import quantize_weight, unpack_int4
    from glmtune.modeling.quantization_cuda import _get_kernels, cuda_dequantize

    def torch_path(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
        values = unpack_int4(q) if bits == 4 else q
        if dtype == torch.float16:
            return values.to(torch.float16) * scale.to(torch.float16)[:, None]
        return (values.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)

    usable = device.type == "cuda" and _get_kernels() is not None
    rows = []
    for out_features, in_features in KERNEL_SHAPES[size]:
        weight = torch.randn(out_features, in_features, dtype=torch.float16, device=device)
        for bits in (8, 4):
            q, scale = quantize_weight(weight, bits)
            for dtype in (torch.float16, torch.bfloat16):
                reference = torch_path(q, scale, bits, dtype)
                torch_s = timed(lambda: torch_path(q, scale, bits, dtype), device, 20)  # noqa: B023
                if not usable:
                    rows.append(f"| {out_features}x{in_features} | int{bits} | {str(dtype)[6:]} | n/a (no CUDA "
                                f"kernels here) | | {torch_s * 1e3:.3f} | |")
                    continue
                fused = cuda_dequantize(q, scale, bits, dtype)
                same = torch.equal(fused.view(torch.int16), reference.view(torch.int16))
                kernel_s = timed(lambda: cuda_dequantize(q, scale, bits, dtype), device, 20)  # noqa: B023
                rows.append(f"| {out_features}x{in_features} | int{bits} | {str(dtype)[6:]} | "
                            f"{'yes' if same else 'NO'} | {kernel_s * 1e3:.3f} | {torch_s * 1e3:.3f} | "
                            f"{torch_s / kernel_s:.1f}x |")
    return rows


# --- 3. memory of one fine-tuning step ---------------------------------------------------------------------

def paper_gib(size: str, method: str, bits: int, tokens: int, pre_seq_len: int, rank: int = 8) -> float:
    """On-paper bytes (GiB) torch allocates at the peak of one step: weights (fp16, or int8/int4 block matrices +
    fp16 scales), fp32 trainable state (weight, grad, two Adam moments), fp16 activations kept for backward
    (Korthikanti et al.: L·s·h·(34 + 5·a·s/h) per layer, s counting the prefix for attention), the output
    layer's logits at the labelled positions (fp16 + fp32 log-probs + grad), and the largest layer dequantized
    during its matmul. The CUDA context (~0.5 GiB, seen by nvidia-smi, not by torch) is not included."""
    layers, hidden, heads, inner, vocab = SIZES[size]
    block = layers * (4 * hidden * hidden + 2 * hidden * inner)
    scales = layers * (3 * hidden + hidden + inner + hidden) * 2
    rest = (2 * vocab * hidden + layers * (3 * hidden + hidden + inner + hidden + 4 * hidden) + 2 * hidden) * 2
    weights = block * (2 if bits == 0 else bits / 8) + (scales if bits else 0) + rest
    trainable = {"lora": layers * rank * (hidden + 3 * hidden), "ptv2": pre_seq_len * layers * 2 * hidden}[method]
    keys = tokens + (pre_seq_len if method == "ptv2" else 0)
    activations = layers * tokens * hidden * (34 + 5 * heads * keys / hidden)
    logits = tokens * vocab * (2 + 4 + 4)
    transient = inner * hidden * 2 if bits else 0
    return (weights + trainable * 16 + activations + logits + transient) / GIB


def step_memory(size: str, device: torch.device, method: str, bits: int, tokens: int,
                pre_seq_len: int) -> float | None:
    """Peak bytes (GiB) torch allocated during one optimizer step through the trainer, the model resident (the
    fp16 weights a quantized base is made from are gone by then, as after loading a quantized checkpoint); None
    on the CPU, where torch keeps no such count (the step still runs, so the smoke mode checks it works)."""
    from glmtune_trainer.engine import CausalLMLoss, PlainEngine
    from glmtune_trainer.methods import apply_method
    from glmtune_trainer.optim import build_optimizer, parameter_groups

    from glmtune.spec import MethodSpec

    free(device)
    overrides = {"pre_seq_len": pre_seq_len, "prefix_projection": False} if method == "ptv2" else {}
    model = build(size, device, torch.float16, bits, **overrides)
    spec = {"name": "lora", "lora": {"r": 8}} if method == "lora" else {"name": "ptv2",
                                                                       "ptv2": {"pre_seq_len": pre_seq_len}}
    model = apply_method(model, MethodSpec.model_validate(spec), 1)
    model.train()
    engine = PlainEngine(CausalLMLoss(model), build_optimizer("adamw", parameter_groups(model, 0.0), 1e-4), "fp32",
                         1.0, device, distributed=False)
    free(device)  # the peak from here on: resident model + one step
    engine.micro_step(train_batch(tokens, device), 1.0 / tokens, 1.0, last=True)
    engine.finish_step(True)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    del engine, model
    free(device)
    return peak


def train_batch(tokens: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """One packed row: random ids ending in [gMASK] <sop> the way a ChatGLM-6B prompt does, all labelled."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 130000, (1, tokens), generator=generator)
    ids[0, tokens // 2 - 2:tokens // 2] = torch.tensor([130001, 130004])
    labels = ids.clone()
    labels[0, : tokens // 2] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


# --- 4. training throughput ---------------------------------------------------------------------------------

def gemm_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured torch.mm FLOP/s at [size, size] x [size, size] (best of 10)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = min(timed(lambda: torch.mm(a, b), device, 1) for _ in range(10))
    return 2 * size**3 / best


def training_speed(size: str, device: torch.device, tokens: int, steps: int) -> dict[str, float]:
    """LoRA r8 bf16 (autocast) steps of one packed row of `tokens`: tokens/s and model FLOP/s (4·N per token for
    LoRA, N the matrix-product parameters, plus attention's 4·L·s·h·(1/2 causal) forward+input-grad terms)."""
    from glmtune_trainer.engine import CausalLMLoss, PlainEngine
    from glmtune_trainer.methods import apply_method
    from glmtune_trainer.optim import build_optimizer, parameter_groups

    from glmtune.spec import MethodSpec

    free(device)
    dtype = torch.bfloat16
    model = build(size, device, dtype)
    model = apply_method(model, MethodSpec.model_validate({"name": "lora", "lora": {"r": 8}}), steps + 2)
    model.train()
    engine = PlainEngine(CausalLMLoss(model), build_optimizer("adamw", parameter_groups(model, 0.0), 1e-4), "bf16",
                         1.0, device, distributed=False)

    def step() -> None:
        engine.micro_step(train_batch(tokens, device), 1.0 / tokens, 1.0, last=True)
        engine.finish_step(True)

    seconds = timed(step, device, steps)
    layers, hidden, _heads, inner, vocab = SIZES[size]
    matmul = layers * (4 * hidden * hidden + 2 * hidden * inner) + vocab * hidden
    attention = layers * 4 * tokens * hidden / 2  # QK^T and PV, causal half, per token (forward 2x + input-grad 2x)
    flops = (4 * matmul + 2 * attention) * tokens / seconds
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds, "flops": flops}


# --- 5. serving ---------------------------------------------------------------------------------------------

class StandInTokenizer:
    """Random weights emit ids without text: one character per id keeps the engine's text path running."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(ids)


def serving_speed(model: torch.nn.Module, prompt: int, decode: int, streams: int) -> dict[str, float]:
    """Batch-1 decode tokens/s, then `streams` concurrent requests: aggregate tokens/s and TTFT p50/p95."""
    from glmtune_inference.generation import GenerationParams
    from glmtune_inference.loading import ServedModel
    from glmtune_inference.scheduler import Finished, ServingEngine, TextDelta

    served = ServedModel(name="m", model=model.eval(), tokenizer=StandInTokenizer(), template="v1", family="v1",
                         context_length=4096)
    params = GenerationParams(max_new_tokens=decode, do_sample=False, max_length=4096)
    generator = torch.Generator().manual_seed(0)

    def prompt_ids() -> list[int]:
        return torch.randint(5, 130000, (prompt - 2,), generator=generator).tolist() + [130001, 130004]

    async def run(count: int) -> tuple[float, list[tuple[float, float, int]]]:
        engine = ServingEngine({"m": served}, max_batch=max(count, 1), queue_size=count + 1)
        engine.start()

        async def one() -> tuple[float, float, int]:
            start = time.perf_counter()
            first, tokens = None, 0
            async for event in engine.submit("m", prompt_ids(), params):
                if isinstance(event, TextDelta) and first is None:
                    first = time.perf_counter()
                if isinstance(event, Finished):
                    tokens = event.completion_tokens
            return first - start, time.perf_counter() - first, tokens

        try:
            begin = time.perf_counter()
            done = await asyncio.gather(*(one() for _ in range(count)))
            return time.perf_counter() - begin, done
        finally:
            await asyncio.to_thread(engine.stop, 5.0)

    asyncio.run(run(1))  # warm-up: kernels, allocator
    _, [(_, rest, tokens)] = asyncio.run(run(1))
    batch1 = (tokens - 1) / rest
    wall, done = asyncio.run(run(streams))
    ttfts = sorted(t for t, _, _ in done)
    return {"batch1": batch1, "aggregate": sum(n for _, _, n in done) / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


# --- the report ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def section(name: str, failures: list[str]) -> Iterator[None]:
    """Run one step; a failure is reported in the table instead of stopping the other steps."""
    start = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        yield
    except Exception as exc:  # the check reports every failing step, so it goes on to the next
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
        print(f"[gpu_check] {name} FAILED: {exc!r}", flush=True)
    print(f"[gpu_check] {name} took {time.perf_counter() - start:.1f} s", flush=True)


def device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name} ({props.total_memory / GIB:.0f} GiB, sm_{props.major}{props.minor}), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the smoke mode)")
    parser.add_argument("--size", choices=sorted(SIZES), default="6b")
    parser.add_argument("--tests", default="not run", help="step 1's pytest summary line")
    parser.add_argument("--tests-rc", type=int, default=None, help="step 1's pytest exit status")
    parser.add_argument("--results", type=Path, help="append to this file instead of bench/RESULTS.md")
    args = parser.parse_args(argv)
    from glmtune.errors import InvalidInputError
    from glmtune.export_loading import resolve_device

    try:
        device = resolve_device(args.device, where="--device")
    except InvalidInputError as exc:  # e.g. the GPU check started where torch sees no GPU: say so, plainly
        print(f"gpu_check: {exc} (on a CPU machine run bench/gpu_check.sh --cpu-smoke)", file=sys.stderr)
        return 2
    smoke = args.size != "6b" or device.type != "cuda"
    work = WORKLOAD[args.size]
    failures: list[str] = []
    lines = [f"device: {device_line(device)}; model: ChatGLM-6B-shaped ({args.size}: layers, hidden, heads, inner, "
             f"vocab = {SIZES[args.size]}), random weights built on the device" + ("; SMOKE run: tiny sizes on "
             "the CPU, numbers say nothing about a GPU and targets are not checked" if smoke else ""), "",
             f"1. `gpu`-marked tests: {args.tests} (exit status {args.tests_rc})", ""]
    if args.tests_rc not in (0, None) and not (smoke and args.tests_rc == 5):
        failures.append(f"gpu tests: exit status {args.tests_rc}")
    with section("2. int8/int4 kernels", failures):
        rows = check_kernels(args.size, device)
        lines += ["2. dequantization kernels vs torch (median of 20):", "",
                  "| shape (out x in) | bits | out dtype | bit-identical | kernel ms | torch ms | speed-up |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
        if any("| NO |" in row for row in rows):
            failures.append("kernels: output differs from torch's dequantization")
    with section("3. memory of one step", failures):
        lines += [f"3. peak memory of one step, batch 1 x {work['mem_tokens']} tokens (torch's allocated peak; the "
                  "on-paper figure is computed in bench/gpu_check.py `paper_gib`):", "",
                  "| setup | measured GiB | on paper GiB | measured / paper | target |", "|---|---|---|---|---|"]
        for method, bits in (("lora", 0), ("lora", 8), ("lora", 4), ("ptv2", 4)):
            name = f"{method}-{'fp16' if bits == 0 else f'int{bits}'}"
            peak = step_memory(args.size, device, method, bits, work["mem_tokens"], work["pre_seq_len"])
            paper = paper_gib(args.size, method, bits, work["mem_tokens"], work["pre_seq_len"])
            target = {"lora-int4": "<= 6.0 GiB", "ptv2-int4": "<= 6.7 GB (6.24 GiB)"}.get(name, "")
            if peak is None:
                lines.append(f"| {name} | n/a (CPU) | {paper:.2f} | | {target} |")
                continue
            lines.append(f"| {name} | {peak:.2f} | {paper:.2f} | {peak / paper:.2f} | {target} |")
            if not smoke and (abs(peak / paper - 1) > 0.10 or (name == "lora-int4" and peak > 6.0)
                              or (name == "ptv2-int4" and peak * GIB > 6.7e9)):
                failures.append(f"memory {name}: {peak:.2f} GiB vs paper {paper:.2f} GiB")
        lines.append("")
    with section("4. LoRA bf16 training", failures):
        speed = training_speed(args.size, device, work["train_tokens"], work["train_steps"])
        peak = gemm_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                         8192 if device.type == "cuda" else 512)
        mfu = speed["flops"] / peak
        lines += [f"4. LoRA r8 bf16 training, one packed row of {work['train_tokens']} tokens: "
                  f"{speed['tokens_per_s']:.0f} tokens/s ({speed['s_per_step']:.3f} s/step), model "
                  f"{speed['flops'] / 1e9:.1f} GFLOP/s = {mfu:.1%} MFU of the {'bf16' if device.type == 'cuda' else 'fp32'}"
                  f" GEMM peak measured in this run, {peak / 1e9:.1f} GFLOP/s (target >= 45%)", ""]
        if not smoke and mfu < TARGETS["MFU"]:
            failures.append(f"training MFU {mfu:.1%} < 45%")
    with section("5. serving", failures):
        lines += [f"5. serving through the batching engine, prompt {work['prompt']} tokens, {work['decode']} new "
                  "tokens, greedy:", "", "| base | batch-1 tok/s | "
                  f"{work['streams']} streams tok/s | ratio (target >= 12x) | TTFT p50 s | TTFT p95 s |",
                  "|---|---|---|---|---|---|"]
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        free(device)
        model = build(args.size, device, dtype)
        for name, bits in (("fp16" if device.type == "cuda" else "fp32", 0), ("int4", 4)):
            if bits:
                model.quantize(bits)
            with torch.inference_mode():
                r = serving_speed(model, work["prompt"], work["decode"], work["streams"])
            ratio = r["aggregate"] / r["batch1"]
            lines.append(f"| {name} | {r['batch1']:.1f} | {r['aggregate']:.1f} | {ratio:.1f}x | "
                         f"{r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} |")
            if not smoke and ratio < TARGETS["streams/batch-1"]:
                failures.append(f"serving {name}: {work['streams']} streams only {ratio:.1f}x batch 1")
        del model
        free(device)
        lines.append("")
    lines.append("result: " + ("smoke run finished" if smoke and not failures else
                               "all steps passed" if not failures else "FAILED: " + "; ".join(failures)))
    body = "\n".join(lines)
    print(body, flush=True)
    if args.results is not None:
        results.RESULTS = args.results
    results.record("gpu_check.py", body, [shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
