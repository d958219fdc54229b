"""Benchmark int8/int4 CPU decoding: fused weight-only kernels vs dequantize + matmul vs dense bf16/fp32.

Three measurements, each in its own child process (own peak RSS), 2 threads by default:
1. per-layer matmul time at ChatGLM-6B weight shapes ([out, in] 4096x4096, 16384x4096, 4096x16384), batch 1:
   fp32 / bf16 dense, int8 / int4 QuantizedLinear with dequantize + matmul (the old path,
   GLMTUNE_FUSED_QUANT=0) and with the fused kernels, bf16 activations (fused fp32 for reference);
2. fused vs dequantize + matmul by rows (batch x sequence) at 4096x4096: where MAX_FUSED_ROWS comes from;
3. batch-1 greedy decode tokens/s of a mid-size ChatGLM2 model (full-size layers: hidden 4096, ffn 13696,
   32 heads, 2 KV groups; `--layers` of them, vocab 65024) in bf16 dense vs int8 vs int4;
4. one decode step's attention at ChatGLM2-6B's shapes (one query, 32 heads over 2 KV groups, head 128, bf16)
   by cache length: SDPA vs glmtune's grouped-matmul decode path (chatglm2_layers.decode_attention).
Times are the best of `--repeat` runs: on a shared machine the minimum is the least disturbed figure.

    python bench/bench_quant_decode.py                  # all, appended to bench/RESULTS.md
    python bench/bench_quant_decode.py --only layers --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from functools import partial

from results import add_worker_arguments, record, run_workers

SHAPES = ((4096, 4096), (16384, 4096), (4096, 16384))
LAYER_MODES = ("fp32 dense", "bf16 dense", "int8 old", "int8 fused", "int4 old", "int4 fused",
               "int8 fused fp32", "int4 fused fp32")


def best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident memory now (the peak includes building the dense model before quantizing it)."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def run_layers(args: argparse.Namespace) -> dict:
    """Milliseconds per call of each mode at each shape, batch 1."""
    import torch
    from torch import nn

    from glmtune.modeling.quantization import QuantizedLinear

    results: dict[str, dict[str, float]] = {}
    for out_features, in_features in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features, bias=False)
        row: dict[str, float] = {}
        x32 = torch.randn(1, in_features)
        with torch.no_grad():
            row["fp32 dense"] = best_ms(partial(linear, x32), args.repeat)
            dense16 = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
            dense16.weight.copy_(linear.weight)
            x16 = x32.bfloat16()
            row["bf16 dense"] = best_ms(partial(dense16, x16), args.repeat)
            del dense16
            for bits in (8, 4):
                layer = QuantizedLinear.from_linear(linear, bits)
                os.environ["GLMTUNE_FUSED_QUANT"] = "0"
                row[f"int{bits} old"] = best_ms(partial(layer, x16), max(1, args.repeat // 3))
                os.environ["GLMTUNE_FUSED_QUANT"] = "1"
                row[f"int{bits} fused"] = best_ms(partial(layer, x16), args.repeat)
                row[f"int{bits} fused fp32"] = best_ms(partial(layer, x32), max(1, args.repeat // 3))
        results[f"{out_features}x{in_features}"] = row
        del linear
    return {"layers": results, "peak_rss_mib": peak_rss_mib()}


def run_rows(args: argparse.Namespace) -> dict:
    """Fused vs dequantize + matmul at 4096x4096 by number of rows, the fused path forced on every row count."""
    import torch
    from torch import nn

    from glmtune.modeling import quantization_cpu
    from glmtune.modeling.quantization import QuantizedLinear

    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False)
    layers = {bits: QuantizedLinear.from_linear(linear, bits) for bits in (8, 4)}
    table: dict[str, dict[str, float]] = {}
    for dtype, rows_list in ((torch.bfloat16, (1, 4, 16, 64, 128, 256)), (torch.float32, (1, 2, 4, 8, 16))):
        for rows in rows_list:
            x = torch.randn(rows, 4096, dtype=dtype)
            entry = {}
            with torch.no_grad():
                for bits, layer in layers.items():
                    quantization_cpu.MAX_FUSED_ROWS[dtype] = 1 << 30
                    entry[f"int{bits} fused"] = best_ms(partial(layer, x), max(1, args.repeat // 3))
                    quantization_cpu.MAX_FUSED_ROWS[dtype] = 0
                    entry[f"int{bits} old"] = best_ms(partial(layer, x), max(1, args.repeat // 3))
            table[f"{str(dtype).removeprefix('torch.')} x{rows}"] = entry
    return {"rows": table, "peak_rss_mib": peak_rss_mib()}


def run_attention(args: argparse.Namespace) -> dict:
    """Milliseconds per decode-step attention call by cached length: SDPA (enable_gqa) vs decode_attention."""
    import torch
    import torch.nn.functional as F

    from glmtune.modeling.chatglm2_layers import decode_attention

    table: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for length in (128, 512, 2048):
        q = torch.randn(1, 32, 1, 128, generator=generator).bfloat16()
        k, v = (torch.randn(1, 2, length, 128, generator=generator).bfloat16() for _ in range(2))
        with torch.no_grad():
            table[f"{length} keys"] = {
                "sdpa": best_ms(partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=True), args.repeat),
                "decode path": best_ms(partial(decode_attention, q, k, v, None), args.repeat),
            }
    return {"attention": table, "peak_rss_mib": peak_rss_mib()}


def build_model(args: argparse.Namespace, bits: int):
    """A random bf16 ChatGLM2 model with full-size layers, quantized to `bits` (0: dense)."""
    import torch

    from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
    from glmtune.modeling.checkpoint import parameters_on_meta

    config = ChatGLM2Config(num_layers=args.layers, padded_vocab_size=65024, hidden_size=4096, ffn_hidden_size=13696,
                            kv_channels=128, num_attention_heads=32, multi_query_attention=True,
                            multi_query_group_num=2, add_qkv_bias=True, seq_length=4096, eos_token_id=2,
                            pad_token_id=0)
    with parameters_on_meta():
        model = ChatGLM2ForConditionalGeneration(config)
    model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 from the start: no transient fp32 copy
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.eval()
    if bits:
        model.quantize(bits)
    return model


def run_decode(args: argparse.Namespace, bits: int, fused: bool) -> dict:
    """Prefill seconds for a `--prompt`-token prompt and decode tokens/s after it (greedy, batch 1)."""
    import torch

    os.environ["GLMTUNE_FUSED_QUANT"] = "1" if fused else "0"
    model = build_model(args, bits)
    new_tokens = args.new_tokens if fused or not bits else args.old_new_tokens
    ids = torch.randint(100, 60000, (1, args.prompt), generator=torch.Generator().manual_seed(1))

    def generate(count: int) -> float:
        start = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=count, min_new_tokens=count)
        return time.perf_counter() - start

    with torch.no_grad():
        generate(2)
        prefill = min(generate(1) for _ in range(2))
        total = generate(new_tokens + 1)
    return {"prefill_s": prefill, "tokens_per_s": new_tokens / max(total - prefill, 1e-9), "new_tokens": new_tokens,
            "rss_mib": rss_mib(), "peak_rss_mib": peak_rss_mib()}


WORKERS = {
    "layers": run_layers,
    "rows": run_rows,
    "attention": run_attention,
    "decode-bf16": lambda a: run_decode(a, 0, True),
    "decode-int8": lambda a: run_decode(a, 8, True),
    "decode-int4": lambda a: run_decode(a, 4, True),
    "decode-int8-old": lambda a: run_decode(a, 8, False),
    "decode-int4-old": lambda a: run_decode(a, 4, False),
}


def report(args: argparse.Namespace, results: dict) -> str:
    """Markdown tables and ratios of whatever was measured."""
    out = [f"torch threads {args.threads}; times are the best of {args.repeat} (fewer for the slow modes)", ""]
    if "layers" in results:
        out += ["Per-layer matmul, batch 1, bf16 activations unless marked fp32 (ms):", "",
                "| weight [out x in] | " + " | ".join(LAYER_MODES) + " | int8 fused/old | int4 fused/old "
                "| int8 fused/bf16 dense | int4 fused/bf16 dense |", "|---" * (len(LAYER_MODES) + 5) + "|"]
        for shape, row in results["layers"]["layers"].items():
            speed = [row["int8 old"] / row["int8 fused"], row["int4 old"] / row["int4 fused"],
                     row["bf16 dense"] / row["int8 fused"], row["bf16 dense"] / row["int4 fused"]]
            out.append(f"| {shape} | " + " | ".join(f"{row[m]:.2f}" for m in LAYER_MODES) + " | "
                       + " | ".join(f"{s:.1f}x faster" for s in speed) + " |")
        out.append("")
    if "rows" in results:
        out += ["Fused vs dequantize + matmul by rows at 4096x4096 (ms):", "",
                "| activations x rows | int8 fused | int8 old | int4 fused | int4 old |", "|---|---|---|---|---|"]
        for key, entry in results["rows"]["rows"].items():
            out.append(f"| {key} | {entry['int8 fused']:.2f} | {entry['int8 old']:.2f} | {entry['int4 fused']:.2f} "
                       f"| {entry['int4 old']:.2f} |")
        out.append("")
    if "attention" in results:
        out += ["Decode-step attention, 1 query, 32 heads / 2 KV groups, head 128, bf16 (ms):", "",
                "| cached keys | SDPA | decode path | speed-up |", "|---|---|---|---|"]
        for key, entry in results["attention"]["attention"].items():
            out.append(f"| {key} | {entry['sdpa']:.3f} | {entry['decode path']:.3f} "
                       f"| {entry['sdpa'] / entry['decode path']:.1f}x |")
        out.append("")
    decode = {k: v for k, v in results.items() if k.startswith("decode-")}
    if decode:
        out += [f"Greedy decode, batch 1: ChatGLM2 layout with {args.layers} full-size layers (hidden 4096, ffn 13696, "
                f"vocab 65024, bf16 lm_head), prompt {args.prompt} tokens:", "",
                "| mode | decode tokens/s | prefill s | new tokens | RSS after decoding MiB | peak RSS MiB |",
                "|---|---|---|---|---|---|"]
        for name, r in decode.items():
            out.append(f"| {name.removeprefix('decode-')} | {r['tokens_per_s']:.2f} | {r['prefill_s']:.2f} "
                       f"| {r['new_tokens']} | {r['rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |")
        base = decode.get("decode-bf16")
        ratios = [f"{name.removeprefix('decode-')}/bf16 decode: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x"
                  for name, r in decode.items() if base and name != "decode-bf16"]
        out += ["", "; ".join(ratios)]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS of the workers)")
    parser.add_argument("--repeat", type=int, default=15, help="timed calls per layer measurement (best kept)")
    parser.add_argument("--layers", type=int, default=4, help="full-size layers of the decode model")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens timed for bf16 and fused modes")
    parser.add_argument("--old-new-tokens", type=int, default=3,
                        help="decoded tokens timed with dequantize + matmul (seconds per token)")
    add_worker_arguments(parser, WORKERS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-record"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = run_workers(__file__, args.only or list(WORKERS), forwarded, env)
    text = report(args, results)
    print("\n" + text)
    if not args.no_record:
        record("bench_quant_decode.py", text, forwarded)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
