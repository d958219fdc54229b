"""Peer benchmark: glmtune against LLaMA-Factory (PyPI `llamafactory`, in its own venv) on the same GLM-4 run.

Same random small GLM-4-9B-architecture model (4 layers, hidden 512, 8 heads over 2 key/value groups, 151552
embedding rows) saved in both layouts (glmtune trains the remote-code one, LLaMA-Factory loads the `-hf` one into
transformers' GlmForCausalLM: the same weights, the same logits), the same byte-level BPE tokenizer trained
in-process on the data (the real GLM-4 files are not at hand), the first `--samples` alpaca_zh samples, max length
1024, LoRA r 8 (alpha 32, dropout 0.1) on the attention's query/key/value, on the CPU in fp32 or (`--precision
bf16`) in bf16 mixed precision the way each tool's users ask for it (glmtune `training.precision: bf16`,
LLaMA-Factory `bf16: true`: bf16 base weights, fp32 LoRA weights, bf16 autocast). Each side uses its
own chat template for GLM-4 and its best packing: glmtune `strategy: packing` (rows of whole samples, attention
kept inside each sample), LLaMA-Factory `neat_packing` (the same, its contamination-free packing). Each side runs
in a child process of its own (peak RSS is its own, imports included) and is timed over `--steps` optimizer steps
of one packed row after `--warmup`; real tokens are the non-padding ones.

Also checked: the first `--check` samples tokenize to the same prompt and answer ids in both (each side's own
template code), and the first batch's loss (those samples, unpacked, at the initial weights, in the run's
precision) agrees.

    bash scripts/get_llamafactory.sh && OMP_NUM_THREADS=2 python bench/bench_peer.py --rounds 3
    OMP_NUM_THREADS=2 python bench/bench_peer.py --rounds 3 --precision bf16
    OMP_NUM_THREADS=1 python bench/bench_peer.py --parallel     # on cores other jobs share: load hits both alike
    python bench/bench_peer.py --only glmtune --no-record
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
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GLMTUNE_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data" / "alpaca_zh_0-3252.json"
PEER_PYTHON = REPO / ".venv-llamafactory" / "bin" / "python"
SIDES = ("glmtune", "llamafactory")
PRECISION_WORDS = {"fp32": "fp32", "bf16": "bf16 mixed precision (bf16 base weights and autocast, fp32 LoRA weights)"}
LORA = {"r": 8, "alpha": 32, "dropout": 0.1}
LEARNING_RATE = 1e-4
# Base weights' dtype per precision: the trainer's rule for LoRA (glmtune.spec: `model_dtype`), LLaMA-Factory's too.
BASE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prepare(work: Path, samples: int, vocab: int) -> None:
    """The data file (and LLaMA-Factory's dataset_info.json), the tokenizer, and the model in both layouts."""
    from glmtune.modeling.chatglm2 import ChatGLM2ForConditionalGeneration
    from glmtune.modeling.glm4 import HF, REMOTE, tiny_glm4_config
    from glmtune.modeling.glm4_checkpoint import save_glm4
    from glmtune.tokenization.glm4 import load_glm4_tokenizer, train_tiny_glm4_tokenizer

    records = json.loads(DATA.read_text(encoding="utf-8"))[:samples]
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "alpaca.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"alpaca_zh": {"file_name": "alpaca.json"}}),
                                            encoding="utf-8")
    if (work / "hf" / "config.json").is_file() and (work / "remote" / "config.json").is_file():
        return
    texts = [record[key] for record in records for key in ("instruction", "input", "output") if record.get(key)]
    tokenizer = load_glm4_tokenizer(train_tiny_glm4_tokenizer(work / "tokenizer", texts, vocab_size=vocab))
    torch.manual_seed(0)
    model = ChatGLM2ForConditionalGeneration(tiny_glm4_config("small", tokenizer, vocab_rows=151552))
    save_glm4(model, work / "remote", REMOTE, tokenizer)
    save_glm4(model, work / "hf", HF, tokenizer)


def _query(record: dict[str, str]) -> str:
    return "\n".join(part for part in (record["instruction"], record.get("input", "")) if part)


def glmtune_side(work: Path, steps: int, warmup: int, max_length: int, check: int,
                 precision: str) -> dict[str, Any]:
    """glmtune: records built with packing, LoRA through the trainer's engine in `precision`, SDPA."""
    import numpy as np
    from glmtune_trainer.batches import RecordSubset
    from glmtune_trainer.data.build import BuildConfig, build_records
    from glmtune_trainer.data.dataset import RecordBatches, RecordDataset
    from glmtune_trainer.engine import CausalLMLoss, PlainEngine
    from glmtune_trainer.methods import apply_method
    from glmtune_trainer.optim import build_optimizer, parameter_groups

    from glmtune.modeling import load_model
    from glmtune.spec import MethodSpec
    from glmtune.templates import encode_answer, encode_prompt
    from glmtune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(work / "remote")
    records = json.loads((work / "data" / "alpaca.json").read_text(encoding="utf-8"))
    pairs = [(encode_prompt(tokenizer, "glm4", _query(r)).ids, encode_answer(tokenizer, "glm4", r["output"]))
             for r in records[:check]]
    torch.manual_seed(0)
    model = load_model(work / "remote", dtype=str(BASE_DTYPE[precision]).removeprefix("torch."))
    model = apply_method(model, MethodSpec.model_validate(
        {"name": "lora", "lora": {**LORA, "targetModules": ["query_key_value"]}}), steps + warmup)
    for param in model.parameters():  # as the trainer does: fp32 master weights for what trains
        if param.requires_grad:
            param.data = param.data.float()
    first_loss = _first_loss(model, pairs, precision)
    out = work / "glmtune-records"
    build_records(BuildConfig(inputs=[str(work / "data" / "alpaca.json")], tokenizer=str(work / "remote"),
                              out=str(out), strategy="packing", max_length=max_length, shuffle=True, seed=0,
                              progress=False, template="glm4"))
    dataset = RecordDataset(out)
    collate = dataset.collator(pad_to_multiple_of=1, segment_ids=True)
    batches = iter(RecordBatches(RecordSubset([dataset], np.arange(len(dataset))), 1, collate, seed=0, rank=0,
                                 world_size=1))
    model.train()
    engine = PlainEngine(CausalLMLoss(model), build_optimizer("adamw", parameter_groups(model, 0.0), LEARNING_RATE),
                         precision, 1.0, torch.device("cpu"), distributed=False)
    real, elapsed = 0, 0.0
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
    return {"side": "glmtune", "real_tokens_per_s": real / elapsed, "s_per_step": elapsed / steps,
            "real_tokens": real, "first_batch_loss": first_loss, "pairs": pairs,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _first_loss(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], precision: str) -> float:
    """Mean loss over the answer tokens of `pairs` (one unpadded forward each), at the model's current weights,
    under bf16 autocast for bf16 as training runs."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        for prompt, answer in pairs:
            ids = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                     reduction="sum")
            total, count = total + float(loss), count + len(answer)
    return total / count


def peer_side(work: Path, steps: int, warmup: int, max_length: int, check: int, precision: str) -> dict[str, Any]:
    """LLaMA-Factory (in its own venv): its glm4 template, neat packing, LoRA, HF Trainer on the CPU in
    `precision` (bf16: its `bf16: true`)."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from llamafactory.train.tuner import run_exp
    from transformers import AutoModelForCausalLM, TrainerCallback

    args = {"model_name_or_path": str(work / "hf"), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_rank": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
            "lora_target": "q_proj,k_proj,v_proj", "template": "glm4", "dataset": "alpaca_zh",
            "dataset_dir": str(work / "data"), "cutoff_len": max_length, "neat_packing": True,
            "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": "constant", "max_steps": warmup + steps, "logging_steps": 1,
            "output_dir": str(work / "llamafactory-out"), "overwrite_output_dir": True, "report_to": "none",
            "save_strategy": "no", "use_cpu": True, "bf16": precision == "bf16", "fp16": False, "seed": 0,
            "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "disable_tqdm": True,
            "overwrite_cache": True}
    model_args, data_args, _, _, _ = get_train_args(dict(args))
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    records = json.loads((work / "data" / "alpaca.json").read_text(encoding="utf-8"))
    pairs = [template.encode_oneturn(tokenizer, [{"role": "user", "content": _query(r)},
                                                 {"role": "assistant", "content": r["output"]}])
             for r in records[:check]]
    if template.efficient_eos:  # as its supervised processor does: the eos ends the trained answer
        pairs = [(prompt, answer + [tokenizer.eos_token_id]) for prompt, answer in pairs]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=BASE_DTYPE[precision])
    first_loss = _first_loss(base, pairs, precision)  # LoRA starts as the identity: the base's loss is the model's
    del base

    class Timer(TrainerCallback):
        """Seconds and non-padding tokens of the optimizer steps after the warm-up. Tokens are counted at the
        model's input: with neat packing the trainer's own count (`include_num_input_tokens_seen`) sums the 4D
        float mask, so a real token is a position that may attend to itself (the mask's diagonal is 0)."""

        def __init__(self) -> None:
            self.elapsed, self.tokens, self.start, self.seen, self.counted = 0.0, 0, 0.0, 0, 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            model.register_forward_pre_hook(self._count, with_kwargs=True)

        def _count(self, module: Any, positional: Any, named: dict[str, Any]) -> None:
            mask = named.get("attention_mask")
            if mask is None:
                self.counted += int(named["input_ids"].numel())
            elif mask.dim() == 4:
                self.counted += int((mask[:, 0].diagonal(dim1=-2, dim2=-1) == 0).sum())
            else:
                self.counted += int((mask != 0).sum())

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start, self.seen = time.perf_counter(), self.counted

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > warmup:
                self.elapsed += time.perf_counter() - self.start
                self.tokens += self.counted - self.seen

    timer = Timer()
    run_exp(args, callbacks=[timer])
    return {"side": "llamafactory", "real_tokens_per_s": timer.tokens / timer.elapsed,
            "s_per_step": timer.elapsed / steps, "real_tokens": timer.tokens, "first_batch_loss": first_loss,
            "pairs": [[list(p), list(a)] for p, a in pairs],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="alpaca_zh samples (default 256)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192, help="ranked tokens of the trained tokenizer")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--check", type=int, default=4, help="samples whose ids and first loss are compared")
    parser.add_argument("--precision", choices=tuple(BASE_DTYPE), default="fp32",
                        help="fp32, or bf16 mixed precision on both sides (default fp32)")
    parser.add_argument("--only", choices=SIDES, action="append", help="run only this side")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times; each side's "
                        "fastest round is reported (noise from other jobs only slows runs down)")
    parser.add_argument("--parallel", action="store_true", help="run both sides at the same time (shared cores)")
    parser.add_argument("--work", type=Path, help="folder for model, tokenizer and data (default: a temp folder)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def report(results: dict[str, dict]) -> str:
    """The table, the tokenization check and the targets (glmtune >= 2x the peer's real tokens/s at <= 0.7x its
    peak RSS)."""
    lines = ["| side | real tok/s | s/step | peak RSS MiB | first-batch loss |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['real_tokens_per_s']:.1f} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['first_batch_loss']:.5f} |")
    ours, peer = results.get("glmtune"), results.get("llamafactory")
    if ours and peer:
        same = [list(map(list, p)) for p in ours["pairs"]] == [list(map(list, p)) for p in peer["pairs"]]
        lines.append(f"\nprompts and answers of the first {len(ours['pairs'])} samples tokenize identically: "
                     f"{'yes' if same else 'NO'}; first-batch loss difference "
                     f"{abs(ours['first_batch_loss'] - peer['first_batch_loss']):.2e}")
        lines.append(f"glmtune / LLaMA-Factory: real tokens/s {ours['real_tokens_per_s'] / peer['real_tokens_per_s']:.2f}x "
                     f"(target >= 2x), peak RSS {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x (target <= 0.7x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        side = glmtune_side if args.worker == "glmtune" else peer_side
        print(json.dumps(side(args.work, args.steps, args.warmup, args.max_length, args.check, args.precision)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import record

    names = args.only or list(SIDES)
    if "llamafactory" in names and not PEER_PYTHON.is_file():
        sys.exit(f"bench_peer.py: {PEER_PYTHON} is missing: run scripts/get_llamafactory.sh first")
    with tempfile.TemporaryDirectory(prefix="glmtune-peer-") as tmp:
        work = args.work or Path(tmp)
        prepare(work, args.samples, args.vocab)
        results: dict[str, dict] = {}
        rounds: list[dict[str, float]] = []
        # --parallel: both sides at once, so load from other jobs on shared cores falls on both alike
        batches = [names] if args.parallel else [[name] for name in names]
        # --rounds: the sides alternate; interference only slows a run down, so each side's fastest round counts
        for batch in [b for _ in range(args.rounds) for b in batches]:
            running = {}
            for name in batch:
                python = sys.executable if name == "glmtune" else str(PEER_PYTHON)
                command = [python, __file__, "--worker", name, "--work", str(work), "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--max-length", str(args.max_length),
                           "--check", str(args.check), "--precision", args.precision]
                running[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, process in running.items():
                out, err = process.communicate()
                if process.returncode:
                    sys.stderr.write(err[-6000:])
                    return process.returncode
                result = json.loads(out.strip().splitlines()[-1])
                if not rounds or name in rounds[-1]:
                    rounds.append({})
                rounds[-1][name] = result["real_tokens_per_s"]
                if name not in results or result["real_tokens_per_s"] > results[name]["real_tokens_per_s"]:
                    results[name] = result
                print(f"{name}: {result['real_tokens_per_s']:.1f} real tok/s", file=sys.stderr)
    setup = (f"GLM-4 architecture, small (4 layers, hidden 512, 8 heads / 2 kv groups, 151552 embedding rows), "
             f"{PRECISION_WORDS[args.precision]}, CPU; {args.samples} alpaca_zh samples, byte-level BPE tokenizer trained in-process ({args.vocab} ranks "
             f"+ GLM-4's special tokens), max length {args.max_length}; LoRA r {LORA['r']} on query/key/value; "
             f"glmtune: packing (batch 1 row), its glm4 template; LLaMA-Factory: neat_packing (batch 1 row), its glm4 "
             f"template, GlmForCausalLM; {args.steps} timed optimizer steps after {args.warmup} warm-up each, "
             f"{'both sides at the same time' if args.parallel else 'one side after the other'}"
             f"{f'; {args.rounds} rounds, each side its fastest' if args.rounds > 1 else ''}")
    table = report(results)
    if args.rounds > 1:
        table += "\nreal tokens/s per round: " + "; ".join(
            ", ".join(f"{name} {value:.1f}" for name, value in r.items()) for r in rounds)
    print(f"{setup}\n\n{table}")
    if not args.no_record:
        record("bench_peer.py", f"{setup}\n\n{table}", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
