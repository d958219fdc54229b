"""Benchmark training: seed-style (pad to max length, "math" attention, full-vocabulary loss, no packing) vs
glmtune defaults (packing, SDPA, chunked label-only loss), same data, model and LoRA r 8.

Data: the first `--samples` alpaca_zh samples tokenized with the real ice_text tokenizer, max length 1024.
Model: a random small ChatGLM-6B (4 layers, hidden 512, 8 heads, vocab 130528). Each measurement runs in its
own child process (so peak RSS is its own) and times `--steps` optimizer steps after `--warmup`. MFU =
k · N · real tokens/s ÷ the measured fp32 GEMM peak (k 4 for LoRA, 6 for full; N = matmul parameters).

    OMP_NUM_THREADS=2 python bench/bench_train.py                  # LoRA and full, appends to RESULTS.md
    python bench/bench_train.py --only glmtune-lora --no-record     # one measurement
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import record

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GLMTUNE_SHARED", REPO.parent / "shared"))
TOKENIZER = SHARED / "reference" / "vectors" / "tokenizers" / "chatglm6b"
DATA = SHARED / "data" / "alpaca_zh_0-3252.json"
STYLES = {"seed": {"attn": "math", "strategy": "truncation", "batch": 4, "pad_to_max": True},
          "glmtune": {"attn": "sdpa", "strategy": "packing", "batch": 1, "pad_to_max": False}}


def prepare(work: Path, samples: int, max_length: int) -> None:
    """Model directory (small v1, real ids, real tokenizer), the data file, and records for both strategies."""
    from glmtune_trainer.data.build import BuildConfig, build_records

    from glmtune.modeling import save_pretrained, tiny_config
    from glmtune.modeling.checkpoint import model_classes
    from glmtune.tokenization import load_tokenizer

    if not (work / "model" / "config.json").is_file():
        tokenizer = load_tokenizer(TOKENIZER)
        torch.manual_seed(0)
        model = model_classes("v1")[1](tiny_config("v1", "small"))
        save_pretrained(model, work / "model", tokenizer=tokenizer)
    data = work / "alpaca.json"
    data.write_text(json.dumps(json.loads(DATA.read_text(encoding="utf-8"))[:samples], ensure_ascii=False))
    for strategy in ("truncation", "packing"):
        build_records(BuildConfig(inputs=[str(data)], tokenizer=str(work / "model"), out=str(work / strategy),
                                  strategy=strategy, max_length=max_length, shuffle=True, seed=0, progress=False))


def gemm_peak(size: int = 4096, repeats: int = 3) -> float:
    """Measured fp32 torch.mm GFLOP/s (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


class SeedStyleLoss(torch.nn.Module):
    """The original training objective: the model's own full-vocabulary fp32 loss over every position."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         labels=labels)
        count = int((labels[:, 1:] != -100).sum())
        return out.loss * count, count, None


def measure(work: Path, name: str, steps: int, warmup: int, max_length: int) -> dict:
    """One child measurement: real tokens/s, seconds per step and peak RSS for style-method `name`."""
    from glmtune_trainer.batches import RecordSubset
    from glmtune_trainer.data.dataset import RecordBatches, RecordDataset
    from glmtune_trainer.engine import CausalLMLoss, PlainEngine
    from glmtune_trainer.methods import apply_method
    from glmtune_trainer.optim import build_optimizer, parameter_groups

    from glmtune.modeling import load_model
    from glmtune.spec import MethodSpec

    style_name, method = name.split("-")
    style = STYLES[style_name]
    torch.manual_seed(0)
    model = load_model(work / "model", dtype="float32", config_overrides={"attn_impl": style["attn"]})
    model = apply_method(model, MethodSpec.model_validate({"name": method, **({"lora": {"r": 8}} if method == "lora"
                                                                              else {})}), steps + warmup)
    model.train()
    records = RecordDataset(work / style["strategy"])
    collate = records.collator(pad_to_multiple_of=max_length if style["pad_to_max"] else 1, segment_ids=True)
    import numpy as np

    stream = RecordBatches(RecordSubset([records], np.arange(len(records))), style["batch"], collate, seed=0,
                           rank=0, world_size=1)
    batches = iter(stream)
    loss_module = CausalLMLoss(model) if style_name == "glmtune" else SeedStyleLoss(model)
    optimizer = build_optimizer("adamw", parameter_groups(model, 0.0), 1e-4)
    engine = PlainEngine(loss_module, optimizer, "fp32", 1.0, torch.device("cpu"), distributed=False)
    real, elapsed, computed, labelled_total = 0, 0.0, 0, 0
    for step in range(warmup + steps):
        batch = next(batches)
        labelled = int((batch["labels"][:, 1:] != -100).sum())
        tokens = int((batch.pop("segment_ids") >= 0).sum())
        start = time.perf_counter()
        engine.micro_step(batch, 1.0 / max(labelled, 1), 1.0, last=True)
        engine.finish_step(True)
        if step >= warmup:
            elapsed += time.perf_counter() - start
            real += tokens
            labelled_total += labelled
            computed += int(batch["input_ids"].numel())
    # Parameters used in matrix products: an untied input embedding is only a lookup.
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = core.get_input_embeddings().weight is core.get_output_embeddings().weight
    matmul_params = sum(p.numel() for p in model.parameters()) - (0 if tied else core.get_input_embeddings().weight.numel())
    head_params = core.get_output_embeddings().weight.numel()
    return {"name": name, "real_tokens_per_s": real / elapsed, "computed_tokens_per_s": computed / elapsed,
            "s_per_step": elapsed / steps, "real_share": real / computed, "matmul_params": matmul_params,
            "head_params": head_params, "labelled_share": labelled_total / real,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def paper_memory(batch: int = 1, length: int = 128, pre_seq_len: int = 128, rank: int = 8) -> str:
    """Expected GPU memory of ChatGLM-6B fine-tuning, from its config (THUDM's ptv2 int4 example: batch 1,
    64 + 64 tokens, pre_seq_len 128, measured 6.7 GB)."""
    vocab, hidden, layers, inner, heads = 130528, 4096, 28, 16384, 32
    block_linear = layers * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * inner)  # the quantized matrices
    scales = layers * (3 * hidden + hidden + inner + hidden) * 2  # one fp16 scale per output row
    embeddings = 2 * vocab * hidden  # word embeddings + untied lm_head, kept in fp16
    small = layers * (3 * hidden + hidden + inner + hidden + 4 * hidden) + 2 * hidden  # biases + layer norms
    gib = 1024**3
    # Activations kept for backward per layer in fp16 (Korthikanti et al.): L·b·h·(34 + 5·a·L/h) bytes.
    activations = layers * length * batch * hidden * (34 + 5 * heads * length / hidden)
    logits = batch * length * vocab * (2 + 4 + 4)  # fp16 logits, fp32 copy for the loss and its gradient
    transient = inner * hidden * 2  # the largest layer dequantized to fp16 during its matmul
    context = 0.6 * gib  # CUDA context + allocator slack, typical
    trainable = {"lora": layers * rank * (hidden + 3 * hidden), "ptv2": pre_seq_len * layers * 2 * hidden}
    rows = ["| setup | base weights GiB | trained params | optimizer+grads GiB | activations+logits GiB | total GiB |",
            "|---|---|---|---|---|---|"]
    for method, bits in (("lora", 16), ("lora", 8), ("lora", 4), ("ptv2", 4)):
        weights = block_linear * bits / 8 + (embeddings + small) * 2 + (scales if bits < 16 else 0)
        states = trainable[method] * 16  # fp32 weight, gradient, two Adam moments
        extra = activations + logits + (transient if bits < 16 else 0)
        total = weights + states + extra + context
        rows.append(f"| {method} {'fp16' if bits == 16 else f'int{bits}'} | {weights / gib:.2f} | "
                    f"{trainable[method] / 1e6:.1f} M | {states / gib:.2f} | {extra / gib:.2f} | {total / gib:.2f} |")
    return (f"ChatGLM-6B on one GPU, on paper (batch {batch}, {length} tokens, LoRA r {rank} on query_key_value, "
            f"ptv2 pre_seq_len {pre_seq_len}; + {context / gib:.1f} GiB CUDA context; THUDM measured 6.7 GB for "
            f"ptv2 int4 with this workload):\n\n" + "\n".join(rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="alpaca_zh samples (default 256)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", action="append", help="seed-lora, glmtune-lora, seed-full, glmtune-full")
    parser.add_argument("--work", type=Path, help="folder for the model and records (default: a temp folder)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# fp32 GEMM peak of this machine measured on an idle CPU (reference/baseline.md). The cores are shared, so a
# peak measured during the run is often lower; it is printed with the setup but MFU uses the idle figure.
IDLE_PEAK_GFLOPS = 188.8


def report(results: dict[str, dict], peak: float) -> str:
    """MFU = k·N·real tok/s ÷ peak (the issue's convention); "MFU executed" counts the work really done:
    padded positions for seed style, the output projection only at labelled positions for glmtune."""
    lines = ["| measurement | real tok/s | computed tok/s | s/step | real share | peak RSS MiB | MFU | "
             "MFU executed |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        k = 4 if name.endswith("lora") else 6
        flops = k * r["matmul_params"] * r["real_tokens_per_s"]
        if name.startswith("seed"):  # every padded position goes through the whole model
            executed = k * r["matmul_params"] * r["computed_tokens_per_s"]
        else:
            executed = k * r["real_tokens_per_s"] * (r["matmul_params"] - r["head_params"] * (1 - r["labelled_share"]))
        lines.append(f"| {name} | {r['real_tokens_per_s']:.1f} | {r['computed_tokens_per_s']:.1f} | "
                     f"{r['s_per_step']:.2f} | {r['real_share']:.1%} | {r['peak_rss_mib']:.0f} | "
                     f"{flops / (IDLE_PEAK_GFLOPS * 1e9):.1%} | {executed / (IDLE_PEAK_GFLOPS * 1e9):.1%} |")
    for method in ("lora", "full"):
        seed, ours = results.get(f"seed-{method}"), results.get(f"glmtune-{method}")
        if seed and ours:
            lines.append(f"\n{method}: real tokens/s {ours['real_tokens_per_s'] / seed['real_tokens_per_s']:.1f}x "
                         f"(target >= 3x), peak RSS {ours['peak_rss_mib'] / seed['peak_rss_mib']:.2f}x (target <= 0.6x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.work, args.child, args.steps, args.warmup, args.max_length)))
        return 0
    names = args.only or ["seed-lora", "glmtune-lora", "seed-full", "glmtune-full"]
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-") as tmp:
        work = args.work or Path(tmp)
        prepare(work, args.samples, args.max_length)
        peak = gemm_peak()
        results = {}
        for name in names:
            command = [sys.executable, __file__, "--child", name, "--work", str(work), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--max-length", str(args.max_length)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name}: {results[name]['real_tokens_per_s']:.1f} real tok/s", file=sys.stderr)
    table = report(results, peak)
    setup = (f"v1 small (4 layers, hidden 512, 8 heads, vocab 130528), fp32, {args.samples} alpaca_zh samples, "
             f"real ice_text tokenizer, max length {args.max_length}; seed style: batch 4 padded to max length, "
             f"math attention, full-vocabulary loss; glmtune: packed rows (batch 1), SDPA, chunked label-only loss; "
             f"{args.steps} timed optimizer steps after {args.warmup} warm-up; MFU against the idle fp32 GEMM peak "
             f"{IDLE_PEAK_GFLOPS} GFLOP/s (measured during this run, with the cores shared: {peak:.1f})")
    table += "\n\n" + paper_memory()
    print(f"{setup}\n\n{table}")
    if not args.no_record:
        record("bench_train.py", f"{setup}\n\n{table}", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
