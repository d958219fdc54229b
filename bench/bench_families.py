"""Benchmark training speed of ChatGLM-6B (v1) against ChatGLM2 (v2) at the same size, same data and settings.

Both models: 4 layers, hidden 512, 8 heads, random init, the REAL vocabulary and tokenizer (v1 ice_text.model,
130528 rows; v2 tokenizer.model, 65024 rows). Data: the first `--samples` alpaca_zh samples, packed into rows of
`--max-length`, batch 1, LoRA r 8 (and full fine-tuning with `--method full`), fp32. Each measurement runs in
its own child process that holds BOTH models and alternates their optimizer steps (v1, v2, v2, v1, ...), so
the load of other processes on these shared cores falls on both alike; `--rounds` repeats it in fresh
children. Ratios are taken within a round. CPU s/step is the process CPU time of the step (both threads):
other processes' load inflates wall time much more than CPU time.

`--loss autograd` also measures the head the plain autograd way (linear, log_softmax, nll_loss per chunk),
the path glmtune took before the fused LinearCrossEntropy; `--profile` prints where one step's time goes.

    OMP_NUM_THREADS=2 python bench/bench_families.py                     # appends to bench/RESULTS.md
    OMP_NUM_THREADS=2 python bench/bench_families.py --profile v1-lora --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results import record

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GLMTUNE_SHARED", REPO.parent / "shared"))
TOKENIZERS = {"v1": SHARED / "reference" / "vectors" / "tokenizers" / "chatglm6b",
              "v2": SHARED / "reference" / "vectors" / "tokenizers" / "chatglm2"}
DATA = SHARED / "data" / "alpaca_zh_0-3252.json"
FAMILIES = ("v1", "v2")


def prepare(work: Path, samples: int, max_length: int) -> None:
    """Per family: a small random model with the published ids, saved with the real tokenizer, and packed
    records of the same data file (all reused when `work` already holds them)."""
    from glmtune_trainer.data.build import BuildConfig, build_records

    from glmtune.modeling import save_pretrained, tiny_config
    from glmtune.modeling.checkpoint import model_classes
    from glmtune.tokenization import load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    data = work / "alpaca.json"
    data.write_text(json.dumps(json.loads(DATA.read_text(encoding="utf-8"))[:samples], ensure_ascii=False),
                    encoding="utf-8")
    for family in FAMILIES:
        model_dir = work / family / "model"
        if not (model_dir / "config.json").is_file():
            torch.manual_seed(0)
            model = model_classes(family)[1](tiny_config(family, "small"))  # published vocabulary size and ids
            save_pretrained(model, model_dir, tokenizer=load_tokenizer(TOKENIZERS[family]))
        build_records(BuildConfig(inputs=[str(data)], tokenizer=str(model_dir), out=str(work / family / "packing"),
                                  strategy="packing", max_length=max_length, shuffle=True, seed=0, progress=False))


def _setup(work: Path, name: str, total_steps: int):
    """(engine, batch iterator, model) for measurement `name` = family-method[-autograd]."""
    import numpy as np
    from glmtune_trainer.batches import RecordSubset
    from glmtune_trainer.data.dataset import RecordBatches, RecordDataset
    from glmtune_trainer.engine import CausalLMLoss, PlainEngine
    from glmtune_trainer.loss import chunked_cross_entropy
    from glmtune_trainer.methods import adalora_orth_loss, apply_method, base_model
    from glmtune_trainer.optim import build_optimizer, parameter_groups

    from glmtune.modeling import load_model
    from glmtune.spec import MethodSpec

    family, method, *variant = name.split("-")
    torch.manual_seed(0)
    model = load_model(work / family / "model", dtype="float32")
    spec = {"name": method, **({"lora": {"r": 8}} if method == "lora" else {})}
    model = apply_method(model, MethodSpec.model_validate(spec), total_steps)
    model.train()

    class AutogradHeadLoss(CausalLMLoss):
        """The same loss through a plain callable head, which takes chunked_cross_entropy's autograd path."""

        def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
            core = base_model(self.model)
            hidden = core.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False)[0]
            head = core.get_output_embeddings()
            total, count = chunked_cross_entropy(hidden, labels, lambda rows: head(rows), self.chunk_size,
                                                 self.recompute)
            return total, count, adalora_orth_loss(self.model)

    loss_module = AutogradHeadLoss(model) if variant == ["autograd"] else CausalLMLoss(model)
    records = RecordDataset(work / family / "packing")
    stream = RecordBatches(RecordSubset([records], np.arange(len(records))), 1, records.collator(segment_ids=True),
                           seed=0, rank=0, world_size=1)
    optimizer = build_optimizer("adamw", parameter_groups(model, 0.0), 1e-4)
    engine = PlainEngine(loss_module, optimizer, "fp32", 1.0, torch.device("cpu"), distributed=False)
    return engine, iter(stream), model


def _step(engine, batches) -> tuple[int, int, int]:
    """One optimizer step on the next batch: (real tokens, labelled tokens, computed tokens)."""
    batch = next(batches)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    real = int((batch.pop("segment_ids") >= 0).sum())
    engine.micro_step(batch, 1.0 / max(labelled, 1), 1.0, last=True)
    engine.finish_step(True)
    return real, labelled, int(batch["input_ids"].numel())


def measure(work: Path, variant: str, steps: int, warmup: int) -> dict:
    """One child: both families' `variant` (e.g. "lora", "lora-autograd") stepped alternately; per family real
    tokens/s, wall and CPU seconds per step, shares, and the child's peak RSS (both models)."""
    from glmtune_trainer.methods import base_model

    runs = {family: _setup(work, f"{family}-{variant}", steps + warmup) for family in FAMILIES}
    for _ in range(warmup):
        for engine, batches, _ in runs.values():
            _step(engine, batches)
    totals = {family: dict.fromkeys(("real", "labelled", "computed", "wall", "cpu"), 0.0) for family in FAMILIES}
    for number in range(steps):
        for family in FAMILIES if number % 2 == 0 else FAMILIES[::-1]:
            engine, batches, _ = runs[family]
            wall, cpu = time.perf_counter(), time.process_time()
            real, labelled, computed = _step(engine, batches)
            total = totals[family]
            total["wall"] += time.perf_counter() - wall
            total["cpu"] += time.process_time() - cpu
            total["real"], total["labelled"] = total["real"] + real, total["labelled"] + labelled
            total["computed"] += computed
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {f"{family}-{variant}": {
        "real_tokens_per_s": t["real"] / t["wall"], "s_per_step": t["wall"] / steps, "cpu_s_per_step": t["cpu"] / steps,
        "real_per_cpu_s": t["real"] / t["cpu"], "real_share": t["real"] / t["computed"],
        "labelled_share": t["labelled"] / t["real"], "peak_rss_mib": peak,
        "vocab": base_model(runs[family][2]).get_output_embeddings().out_features} for family, t in totals.items()}


def profile(work: Path, name: str, steps: int) -> str:
    """torch.profiler table (top operators by self time, with shapes) over `steps` steps after one warm-up."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine, batches, _ = _setup(work, name, steps + 1)
    _step(engine, batches)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            _step(engine, batches)
    averages = prof.key_averages(group_by_input_shape=True)
    return averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)


def report(rounds: list[dict[str, dict]], methods: list[str], variants: list[str]) -> str:
    """Per measurement: median over rounds; per round: the v2/v1 ratios (the only ones the shared cores allow)."""
    lines = ["| measurement | vocab | real tok/s (median) | per round | s/step | CPU s/step | real tok per CPU s | "
             "labelled share | child peak RSS MiB (both models) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        med = {key: statistics.median(run[key] for run in runs) for key in
               ("real_tokens_per_s", "s_per_step", "cpu_s_per_step", "real_per_cpu_s", "peak_rss_mib")}
        per_round = ", ".join(f"{run['real_tokens_per_s']:.1f}" for run in runs)
        lines.append(f"| {name} | {runs[0]['vocab']} | {med['real_tokens_per_s']:.1f} | {per_round} | "
                     f"{med['s_per_step']:.2f} | {med['cpu_s_per_step']:.2f} | {med['real_per_cpu_s']:.1f} | "
                     f"{runs[0]['labelled_share']:.1%} | {med['peak_rss_mib']:.0f} |")
    lines.append("")
    for method in methods:
        for variant in variants:
            v1, v2 = f"v1-{method}{variant}", f"v2-{method}{variant}"
            wall = [r[v2]["real_tokens_per_s"] / r[v1]["real_tokens_per_s"] for r in rounds]
            cpu = [r[v2]["real_per_cpu_s"] / r[v1]["real_per_cpu_s"] for r in rounds]
            lines.append(f"{method}{variant}: v2/v1 real tokens/s per round {', '.join(f'{x:.2f}x' for x in wall)} "
                         f"(median {statistics.median(wall):.2f}x, target <= 2.5x); per CPU second "
                         f"{', '.join(f'{x:.2f}x' for x in cpu)}\n")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="alpaca_zh samples (default 256)")
    parser.add_argument("--max-length", type=int, default=1024, help="packed row length for both families")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating v1/v2 rounds (default 2)")
    parser.add_argument("--method", action="append", choices=("lora", "full"), help="default: lora")
    parser.add_argument("--loss", action="append", choices=("fused", "autograd"),
                        help="head loss implementation(s) to measure (default: fused, the trainer's)")
    parser.add_argument("--profile", metavar="NAME", help="print a profile of NAME (e.g. v1-lora) and exit")
    parser.add_argument("--work", type=Path, help="folder for the models and records (default: a temp folder)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.work, args.child, args.steps, args.warmup)))
        return 0
    methods, losses = args.method or ["lora"], args.loss or ["fused"]
    variants = ["" if loss == "fused" else f"-{loss}" for loss in losses]
    with tempfile.TemporaryDirectory(prefix="glmtune-bench-") as tmp:
        work = args.work or Path(tmp)
        prepare(work, args.samples, args.max_length)
        if args.profile:
            print(profile(work, args.profile, args.steps))
            return 0
        rounds = []
        for number in range(args.rounds):
            results = {}
            for method in methods:
                for variant in variants:
                    command = [sys.executable, __file__, "--child", f"{method}{variant}", "--work", str(work),
                               "--steps", str(args.steps), "--warmup", str(args.warmup)]
                    done = subprocess.run(command, capture_output=True, text=True, check=True)
                    results.update(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"round {number + 1} {method}{variant}: " + ", ".join(
                        f"{family} {results[f'{family}-{method}{variant}']['real_tokens_per_s']:.1f}"
                        for family in FAMILIES) + " real tok/s", file=sys.stderr)
            rounds.append({name: results[name] for name in sorted(results)})
    setup = (f"small v1 vs small v2 (4 layers, hidden 512, 8 heads; v2 MQA 2 groups, SwiGLU 1712), random init, "
             f"real tokenizers and vocabularies, fp32, {args.samples} alpaca_zh samples packed into rows of "
             f"{args.max_length} (batch 1), chunked label-only loss; {args.steps} timed optimizer steps after "
             f"{args.warmup} warm-up each, v1 and v2 steps alternating in one process, {args.rounds} rounds (fresh "
             f"processes); CPU s/step = process CPU time of the step; "
             f"suffix -autograd: the head's loss through linear + log_softmax + nll_loss (the pre-fix path)")
    table = report(rounds, methods, variants)
    print(f"{setup}\n\n{table}")
    if not args.no_record:
        record("bench_families.py", f"{setup}\n\n{table}", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
