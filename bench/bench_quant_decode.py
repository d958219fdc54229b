"""Benchmark int8/int4 CPU decoding: fused weight-only kernels vs dequantize + matmul vs dense bf16/fp32.

Measurements, each in its own child process (own peak RSS), 2 threads by default:
0. glmtune's own kernels (glmtune.kernels) vs torch's at ChatGLM2-6B's shapes, one row: GB/s of weight bytes
   read, each weight cycled through copies that together exceed the CPU caches (as a model's layers do);
1. per-layer matmul time at ChatGLM-6B weight shapes ([out, in] 4096x4096, 16384x4096, 4096x16384), batch 1:
   fp32 / bf16 dense, int8 / int4 QuantizedLinear with dequantize + matmul (the old path,
   GLMTUNE_FUSED_QUANT=0) and with the fused kernels, bf16 activations (fused fp32 for reference);
2. glmtune's kernels vs torch's fused ones vs dequantize + matmul by rows (batch x sequence) at 4096x4096:
   where MAX_FUSED_ROWS and OWN_KERNEL_ROWS come from;
3. batch-1 greedy decode tokens/s of a mid-size ChatGLM2 model (full-size layers: hidden 4096, ffn 13696,
   32 heads, 2 KV groups; `--layers` of them, vocab 65024) in bf16 dense vs int8 vs int4, with glmtune's
   kernels, with torch's only ("-torch") and dequantizing ("-old");
4. one decode step's attention at ChatGLM2-6B's shapes (one query, 32 heads over 2 KV groups, head 128, bf16)
   by cache length: SDPA vs glmtune's grouped-matmul decode path (chatglm2_layers.decode_attention).
Times are the best of `--repeat` runs: on a shared machine the minimum is the least disturbed figure.

    python bench/bench_quant_decode.py                  # all, appended to bench/RESULTS.md
    python bench/bench_quant_decode.py --only layers --no-record
    flock /tmp/glmtune-fullsize.lock python bench/bench_quant_decode.py --only kernels --repeat 8
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
# ChatGLM2-6B's matmuls [out, in]: the blocks' four (quantized in int4/int8 models) and the bf16 output layer
KERNEL_SHAPES = (("QKV", 4608, 4096), ("dense", 4096, 4096), ("h_to_4h", 27392, 4096), ("4h_to_h", 4096, 13696),
                 ("output layer", 65024, 4096))
KERNEL_MODES = ("int4", "int8", "bf16")
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


def run_kernels(args: argparse.Namespace) -> dict:
    """GB/s of weight bytes per one-row call, glmtune's kernels vs torch's, through the layers' own entry points
    (QuantizedLinear for int4/int8, decode_linear vs nn.Linear for bf16); the two alternate, best of --repeat."""
    import torch
    from torch import nn

    from glmtune import kernels
    from glmtune.modeling.quantization import QuantizedLinear, quantize_weight

    table: dict[str, dict[str, float]] = {}
    for name, out_features, in_features in KERNEL_SHAPES:
        torch.manual_seed(0)
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
        x = torch.randn(1, in_features, dtype=torch.bfloat16)
        row: dict[str, float] = {}
        for mode in KERNEL_MODES if name != "output layer" else ("bf16",):
            if mode == "bf16":
                nbytes = weight.numel() * 2
                layers = [nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
                          for _ in range(_copies(nbytes, args))]
                for layer in layers:
                    layer.weight.data.copy_(weight)
                calls = {"ours": [partial(kernels.decode_linear, layer, x) for layer in layers],
                         "torch": [partial(layer, x) for layer in layers]}
            else:
                bits = int(mode[3:])
                qweight, scale = quantize_weight(weight, bits)
                nbytes = qweight.numel() + scale.numel() * 2
                layers = [QuantizedLinear(in_features, out_features, bits, bias=False)
                          for _ in range(_copies(nbytes, args))]
                for layer in layers:
                    layer.weight.data, layer.weight_scale.data = qweight.clone(), scale.clone()
                calls = {"ours": [partial(layer, x) for layer in layers], "torch": [partial(layer, x) for layer in layers]}
            seconds = _alternate(calls, {"ours": "1", "torch": "0"}, args.repeat)
            row[f"{mode} ours"], row[f"{mode} torch"] = (nbytes / seconds[k] / 1e9 for k in ("ours", "torch"))
            del layers, calls
        table[f"{name} {out_features}x{in_features}"] = row
    return {"kernels": table, "features": kernels.features(), "peak_rss_mib": peak_rss_mib()}


def _copies(nbytes: int, args: argparse.Namespace) -> int:
    """Copies of a weight that together exceed the CPU caches (at least two)."""
    return max(2, -(-args.sweep_mib * 2**20 // nbytes))


def _alternate(calls: dict[str, list], switch: dict[str, str], repeat: int) -> dict[str, float]:
    """Best seconds per call of each side, sweeping all its copies once per round, sides alternating with
    GLMTUNE_CPU_KERNELS set to `switch[side]` (on a shared host only same-run comparisons mean anything)."""
    import torch

    best = dict.fromkeys(calls, float("inf"))
    with torch.no_grad():
        for round_ in range(repeat + 1):
            for side, fns in calls.items():
                os.environ["GLMTUNE_CPU_KERNELS"] = switch[side]
                start = time.perf_counter()
                for fn in fns:
                    fn()
                if round_:  # the first round warms up (builds the kernels, touches the pages)
                    best[side] = min(best[side], (time.perf_counter() - start) / len(fns))
    os.environ["GLMTUNE_CPU_KERNELS"] = "1"
    return best


def run_rows(args: argparse.Namespace) -> dict:
    """glmtune's kernels, torch's fused kernels and dequantize + matmul at 4096x4096 by number of rows, every
    path forced on every row count."""
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
                    quantization_cpu.MAX_FUSED_ROWS[dtype] = quantization_cpu.OWN_KERNEL_ROWS = 1 << 30
                    for side, switch in (("ours", "1"), ("torch", "0")):
                        os.environ["GLMTUNE_CPU_KERNELS"] = switch
                        entry[f"int{bits} {side}"] = best_ms(partial(layer, x), max(1, args.repeat // 3))
                    quantization_cpu.MAX_FUSED_ROWS[dtype] = quantization_cpu.OWN_KERNEL_ROWS = 0
                    entry[f"int{bits} old"] = best_ms(partial(layer, x), max(1, args.repeat // 3))
            table[f"{str(dtype).removeprefix('torch.')} x{rows}"] = entry
    os.environ["GLMTUNE_CPU_KERNELS"] = "1"
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


def run_decode(args: argparse.Namespace, bits: int, fused: bool, own: bool = True) -> dict:
    """Prefill seconds for a `--prompt`-token prompt and decode tokens/s after it (greedy, batch 1); `own`:
    glmtune's CPU kernels on (else torch's kernels only)."""
    import torch

    os.environ["GLMTUNE_FUSED_QUANT"] = "1" if fused else "0"
    os.environ["GLMTUNE_CPU_KERNELS"] = "1" if own else "0"
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
    "kernels": run_kernels,
    "layers": run_layers,
    "rows": run_rows,
    "attention": run_attention,
    "decode-bf16": lambda a: run_decode(a, 0, True),
    "decode-int8": lambda a: run_decode(a, 8, True),
    "decode-int4": lambda a: run_decode(a, 4, True),
    "decode-bf16-torch": lambda a: run_decode(a, 0, True, own=False),
    "decode-int8-torch": lambda a: run_decode(a, 8, True, own=False),
    "decode-int4-torch": lambda a: run_decode(a, 4, True, own=False),
    "decode-int8-old": lambda a: run_decode(a, 8, False),
    "decode-int4-old": lambda a: run_decode(a, 4, False),
}


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: header line, separator, one line per row."""
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def report(args: argparse.Namespace, results: dict) -> str:
    """Markdown tables and ratios of whatever was measured."""
    out = [f"torch threads {args.threads}; times are the best of {args.repeat} (fewer for the slow modes)", ""]
    if "kernels" in results:
        found = results["kernels"]
        out += [f"glmtune's kernels vs torch's, one row, GB/s of weight bytes (higher is better; CPU feature bits "
                f"{found['features']}: 1 AVX512-VNNI, 2 AVX512-BF16, 4 AVX2; sides alternate, weights cycle through "
                f">= {args.sweep_mib} MiB of copies):", ""]
        header = ["matmul [out x in]"] + [f"{m} {side}" for m in KERNEL_MODES for side in ("ours", "torch", "ratio")]
        rows = []
        for shape, row in found["kernels"].items():
            cells = [shape]
            for mode in KERNEL_MODES:
                ours, theirs = row.get(f"{mode} ours"), row.get(f"{mode} torch")
                cells += ["-"] * 3 if ours is None else [f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x"]
            rows.append(cells)
        out += [*markdown_table(header, rows), ""]
    if "layers" in results:
        out += ["Per-layer matmul, batch 1, bf16 activations unless marked fp32 (ms):", ""]
        header = ["weight [out x in]", *LAYER_MODES, "int8 fused/old", "int4 fused/old", "int8 fused/bf16 dense",
                  "int4 fused/bf16 dense"]
        rows = []
        for shape, row in results["layers"]["layers"].items():
            speed = [row["int8 old"] / row["int8 fused"], row["int4 old"] / row["int4 fused"],
                     row["bf16 dense"] / row["int8 fused"], row["bf16 dense"] / row["int4 fused"]]
            rows.append([shape, *(f"{row[m]:.2f}" for m in LAYER_MODES), *(f"{s:.1f}x faster" for s in speed)])
        out += [*markdown_table(header, rows), ""]
    if "rows" in results:
        out += ["glmtune's kernels (ours) vs torch's fused kernels vs dequantize + matmul (old) by rows at 4096x4096 "
                "(ms):", ""]
        columns = ["int8 ours", "int8 torch", "int8 old", "int4 ours", "int4 torch", "int4 old"]
        rows = [[key, *(f"{entry[c]:.2f}" for c in columns)] for key, entry in results["rows"]["rows"].items()]
        out += [*markdown_table(["activations x rows", *columns], rows), ""]
    if "attention" in results:
        out += ["Decode-step attention, 1 query, 32 heads / 2 KV groups, head 128, bf16 (ms):", ""]
        rows = [[key, f"{e['sdpa']:.3f}", f"{e['decode path']:.3f}", f"{e['sdpa'] / e['decode path']:.1f}x"]
                for key, e in results["attention"]["attention"].items()]
        out += [*markdown_table(["cached keys", "SDPA", "decode path", "speed-up"], rows), ""]
    decode = {k: v for k, v in results.items() if k.startswith("decode-")}
    if decode:
        out += [f"Greedy decode, batch 1: ChatGLM2 layout with {args.layers} full-size layers (hidden 4096, ffn 13696, "
                f"vocab 65024, bf16 lm_head), prompt {args.prompt} tokens:", ""]
        rows = [[name.removeprefix("decode-"), f"{r['tokens_per_s']:.2f}", f"{r['prefill_s']:.2f}", str(r["new_tokens"]),
                 f"{r['rss_mib']:.0f}", f"{r['peak_rss_mib']:.0f}"] for name, r in decode.items()]
        out += markdown_table(["mode", "decode tokens/s", "prefill s", "new tokens", "RSS after decoding MiB",
                               "peak RSS MiB"], rows)
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
    parser.add_argument("--sweep-mib", type=int, default=256,
                        help="kernels: copies of each weight cycled per timed round, at least this many MiB in all")
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
