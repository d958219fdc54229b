"""Benchmark the ChatGLM-6B (v1) model: training throughput and peak RSS with SDPA vs the original "math"
attention, and generation throughput with vs without the KV cache.

Each measurement runs in its own child process so its peak RSS is its own. Prints a table and appends it,
with the date, command and machine, to bench/RESULTS.md.

    OMP_NUM_THREADS=2 python bench/bench_model.py            # the default small config, seq 512, batch 4
    python bench/bench_model.py --vocab 4096 --no-record     # quicker, attention-dominated variant
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from results import add_worker_arguments, record, run_workers


def build_model(args: argparse.Namespace, attn_impl: str):
    """A random small ChatGLM-6B-shaped model (the real special ids, fp32)."""
    import torch

    from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration

    torch.manual_seed(0)
    # a reduced vocabulary keeps the special tokens at its top, as the reference case chatglm6b_B does
    special = 130000 if args.vocab >= 130528 else args.vocab - 8
    config = ChatGLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                           num_attention_heads=args.heads, inner_hidden_size=args.inner,
                           max_sequence_length=max(2048, args.seq + args.new_tokens), attn_impl=attn_impl,
                           mask_token_id=special, gmask_token_id=special + 1, bos_token_id=special + 4,
                           eos_token_id=special + 5)
    return ChatGLMForConditionalGeneration(config), config


def random_batch(config, batch: int, length: int, answer: int):
    """Token ids ending `... [gMASK] <sop> answer...` (prompt = length - answer tokens)."""
    import torch

    ids = torch.randint(5, config.mask_token_id, (batch, length))
    ids[:, length - answer - 2] = config.gmask_token_id
    ids[:, length - answer - 1] = config.bos_token_id
    return ids


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_train(args: argparse.Namespace, attn_impl: str) -> dict:
    """Forward + backward (no optimizer step) tokens/s over `--steps` steps after `--warmup`."""
    model, config = build_model(args, attn_impl)
    model.train()
    ids = random_batch(config, args.batch, args.seq, args.seq // 2)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    timings = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        model(ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            timings.append(time.perf_counter() - start)
    return {"tokens_per_s": args.batch * args.seq * len(timings) / sum(timings),
            "step_s": sum(timings) / len(timings), "peak_rss_mib": peak_rss_mib()}


def run_generate(args: argparse.Namespace, use_cache: bool) -> dict:
    """Greedy generation of exactly `--new-tokens` tokens for one prompt of `--prompt` tokens."""
    import torch

    model, config = build_model(args, "sdpa")
    model.eval()
    model.config.use_cache = use_cache
    ids = random_batch(config, 1, args.prompt, 0)
    with torch.no_grad():
        model.generate(ids, do_sample=False, max_new_tokens=2, min_new_tokens=2, use_cache=use_cache)
        start = time.perf_counter()
        out = model.generate(ids, do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                             use_cache=use_cache)
        elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    return {"tokens_per_s": new / elapsed, "seconds": elapsed, "peak_rss_mib": peak_rss_mib()}


WORKERS = {
    "train-sdpa": lambda a: run_train(a, "sdpa"),
    "train-math": lambda a: run_train(a, "math"),
    "generate-cache": lambda a: run_generate(a, True),
    "generate-nocache": lambda a: run_generate(a, False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--inner", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=130528)
    parser.add_argument("--seq", type=int, default=512, help="training sequence length")
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument("--prompt", type=int, default=512,
                        help="generation prompt length (the cache saves re-running it; at 64 the lm_head dominates)")
    parser.add_argument("--new-tokens", type=int, default=128)
    add_worker_arguments(parser, WORKERS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-record"]
    results = run_workers(__file__, args.only or list(WORKERS), forwarded)
    lines = ["| measurement | tokens/s | peak RSS MiB | detail |", "|---|---|---|---|"]
    for name, r in results.items():
        detail = f"{r['step_s']:.2f} s/step" if "step_s" in r else f"{r['seconds']:.2f} s"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {detail} |")
    ratios = []
    if {"train-sdpa", "train-math"} <= results.keys():
        ratios.append(f"sdpa/math training: {results['train-sdpa']['tokens_per_s'] / results['train-math']['tokens_per_s']:.2f}x"
                      " (target >= 1.3x)")
    if {"generate-cache", "generate-nocache"} <= results.keys():
        ratios.append(f"cached/uncached generation: "
                      f"{results['generate-cache']['tokens_per_s'] / results['generate-nocache']['tokens_per_s']:.2f}x"
                      " (target >= 5x)")
    config = (f"v1 config: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, inner {args.inner}, "
              f"vocab {args.vocab}, fp32; training seq {args.seq} x batch {args.batch}, {args.steps} timed steps "
              f"after {args.warmup} warm-up; generation: prompt {args.prompt}, {args.new_tokens} new tokens, batch 1")
    report = "\n".join([config, "", *lines, "", *ratios])
    print("\n" + report)
    if not args.no_record:
        record("bench_model.py", report, forwarded)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
