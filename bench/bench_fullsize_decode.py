"""Full-size ChatGLM2-6B CPU decoding: glmtune bf16 / int8 / int4 vs llama.cpp f16 / q8_0 / q4_0 (issue #12).

Same run, same random weights (bench/fullsize.py's chatglm2-6b), batch 1, `--threads` threads. llama.cpp runs the
GGUF files that `glmtune export --format gguf` writes from that checkpoint (cached next to it, re-exported when
the checkpoint or the exporter changes), through llama-cpp-python built from its sdist (scripts/get_llamacpp.sh,
its own venv). Each measurement is a child process (its own peak RSS): load (+ one warm-up token, so lazily
mapped weights are resident), time to first token of a `--prompt`-token prompt, then greedy decode tokens/s.
Targets: each glmtune mode >= 0.7x its llama.cpp counterpart's tokens/s and peak RSS <= 1.3x. `--rounds` repeats
the measurements in alternating order (the host's speed drifts) and reports each side's best plus every round's
own ratios. glmtune rows name the ops that took a decode step's time (torch.profiler over one extra step), so a
table says which matmul kernels ran; the header names the glmtune commit measured. Run it alone:

    flock /tmp/glmtune-fullsize.lock .venv/bin/python bench/bench_fullsize_decode.py --rounds 2
    ... --only glmtune-int4 --only llamacpp-q4_0 --no-record     # one pair
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from results import add_worker_arguments, record

REPO_ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_PYTHON = Path(os.environ.get("GLMTUNE_LLAMACPP_PYTHON", REPO_ROOT / ".venv-llamacpp" / "bin" / "python"))
PAIRS = (("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0"))
TARGET_SPEED, TARGET_RSS = 0.7, 1.3


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(length: int) -> list[int]:
    """[gMASK] sop + fixed pseudo-random text ids: the same prompt for every engine."""
    import random

    rng = random.Random(1)
    return [64790, 64792] + [rng.randrange(100, 60000) for _ in range(length - 2)]


def gguf_path(args: argparse.Namespace, gguf_type: str) -> Path:
    return Path(args.checkpoint).parent / "gguf" / f"{Path(args.checkpoint).name}-{gguf_type}.gguf"


def export_identity(args: argparse.Namespace) -> str:
    """What a cached GGUF was made from: the checkpoint's identity marker and the exporter's source."""
    marker = Path(args.checkpoint) / ".glmtune-bench.json"
    exporter = [REPO_ROOT / "trainer" / "glmtune_trainer" / name for name in ("gguf_export.py", "gguf_quants.py")]
    data = (marker.read_bytes() if marker.is_file() else b"") + b"".join(path.read_bytes() for path in exporter)
    return hashlib.sha256(data).hexdigest()


def run_export(args: argparse.Namespace, gguf_type: str) -> dict:
    """`glmtune export --format gguf` of the checkpoint (time, peak RSS, size)."""
    from glmtune_trainer.gguf_export import export_gguf

    target = gguf_path(args, gguf_type)
    start = time.perf_counter()
    export_gguf(args.checkpoint, target, gguf_type)
    seconds = time.perf_counter() - start
    target.with_suffix(".identity").write_text(export_identity(args), encoding="utf-8")
    return {"export_s": seconds, "gguf_gib": target.stat().st_size / 2**30, "peak_rss_mib": peak_rss_mib()}


def run_glmtune(args: argparse.Namespace, bits: int) -> dict:
    """glmtune.load_model (bf16, quantized at load for int8/int4) then TTFT and greedy decode with the KV cache."""
    import torch

    import glmtune

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = glmtune.load_model(args.checkpoint, dtype="bfloat16", quantization_bit=bits or None).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[64790]]))  # warm-up token: every weight touched once
        load = time.perf_counter() - start
        ids = torch.tensor([prompt_ids(args.prompt)])
        start = time.perf_counter()
        # only the last position's logits, as llama.cpp computes them (the other 511 rows of the 65024-wide
        # output layer are work no decoder needs)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = time.perf_counter() - start
        past, tokens = out.past_key_values, [int(token)]
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        decode = time.perf_counter() - start
        top_ops = profile_step(model, token, past)
    return {"load_s": load, "ttft_s": ttft, "tokens_per_s": args.new_tokens / decode, "tokens": tokens,
            "peak_rss_mib": peak_rss_mib(), "top_ops": top_ops}


def profile_step(model: object, token: object, past: object) -> list[tuple[str, float]]:
    """The two ops with the most self time in one more decode step, with their share of the time spent in ops:
    which kernels the weight matmuls and the output layer ran through."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=token, past_key_values=past, use_cache=True)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [(e.key, e.self_cpu_time_total / total) for e in events[:2]]


def code_identity() -> str:
    """The commit of the code measured, and whether glmtune/ or the exporter differ from it."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *command], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "glmtune source outside git"
    changed = git("status", "--porcelain", "--", "glmtune", "trainer").splitlines()
    return f"glmtune at {commit}" + (f" + {len(changed)} uncommitted glmtune/trainer files" if changed else "")


def run_llamacpp(args: argparse.Namespace, gguf_type: str) -> dict:
    """llama.cpp (llama-cpp-python) on the exported GGUF: the same measurements, greedy from the raw logits."""
    import llama_cpp
    import numpy as np

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_path(args, gguf_type)), n_ctx=args.prompt + args.new_tokens + 8,
                          n_batch=args.prompt, n_ubatch=args.prompt, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    llm.eval([64790])  # warm-up token: mapped weights paged in, as glmtune's are after loading
    load = time.perf_counter() - start
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids(args.prompt))
    token = next_token()
    ttft = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(args.new_tokens):
        llm.eval([token])
        token = next_token()
        tokens.append(token)
    decode = time.perf_counter() - start
    return {"load_s": load, "ttft_s": ttft, "tokens_per_s": args.new_tokens / decode, "tokens": tokens,
            "peak_rss_mib": peak_rss_mib()}


WORKERS = {
    **{f"export-{q}": partial(run_export, gguf_type=q) for _, q in PAIRS},
    **{f"glmtune-{m}": partial(run_glmtune, bits={"bf16": 0, "int8": 8, "int4": 4}[m]) for m, _ in PAIRS},
    **{f"llamacpp-{q}": partial(run_llamacpp, gguf_type=q) for _, q in PAIRS},
}


def plan(args: argparse.Namespace) -> list[str]:
    """Measurements in pair order (each GGUF exported just before llama.cpp needs it; cached ones skipped)."""
    wanted = args.only or [w for m, q in PAIRS for w in (f"llamacpp-{q}", f"glmtune-{m}")]
    names: list[str] = []
    for name in wanted:
        if name.startswith("llamacpp-"):
            gguf_type = name.removeprefix("llamacpp-")
            identity = gguf_path(args, gguf_type).with_suffix(".identity")
            fresh = identity.is_file() and identity.read_text(encoding="utf-8") == export_identity(args)
            if not (fresh and gguf_path(args, gguf_type).is_file()) and f"export-{gguf_type}" not in names:
                names.append(f"export-{gguf_type}")
        names.append(name)
    return names


def run_child(args: argparse.Namespace, name: str, forwarded: list[str]) -> dict:
    python = str(LLAMACPP_PYTHON) if name.startswith("llamacpp-") else sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "trainer"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([python, __file__, *forwarded, "--checkpoint", args.checkpoint, "--worker", name],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{name} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """One side's rounds as one row: fastest load, TTFT and decode (interference only slows), highest peak RSS."""
    best = dict(max(runs, key=lambda r: r["tokens_per_s"]))
    best["load_s"], best["ttft_s"] = min(r["load_s"] for r in runs), min(r["ttft_s"] for r in runs)
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return best


def round_ratios(rounds: list[dict]) -> list[str]:
    """Each round's decode tokens/s and glmtune / llama.cpp speed ratios (measured minutes apart, not hours)."""
    lines = []
    for number, measured in enumerate(rounds, 1):
        speeds = ", ".join(f"{name} {r['tokens_per_s']:.2f}" for name, r in measured.items())
        speed = {name: r["tokens_per_s"] for name, r in measured.items()}
        ratios = ", ".join(f"{m} {speed[f'glmtune-{m}'] / speed[f'llamacpp-{q}']:.2f}x"
                           for m, q in PAIRS if f"glmtune-{m}" in speed and f"llamacpp-{q}" in speed)
        lines.append(f"round {number}: tokens/s {speeds}" + (f"; speed ratios {ratios}" if ratios else ""))
    return lines


def report(args: argparse.Namespace, results: dict, rounds: list[dict] | None = None) -> str:
    alternated = f"; {args.rounds} rounds in alternating order, each side its best" if args.rounds > 1 else ""
    out = [f"ChatGLM2-6B at full size (random weights, bench/fullsize.py), batch 1, {args.threads} threads, prompt "
           f"{args.prompt} tokens, {args.new_tokens} decoded tokens timed; llama.cpp = llama-cpp-python "
           f"(built from sdist) on the GGUF glmtune exports. Load includes one warm-up token{alternated}. "
           f"{code_identity()}.", ""]
    exports = {k.removeprefix("export-"): v for k, v in results.items() if k.startswith("export-")}
    if exports:
        # issue 12 wants every quantized export within ~1.5x of the f16 one (same run)
        f16 = exports.get("f16", {}).get("export_s")
        out += ["| GGUF export | seconds | x f16 export | GiB | peak RSS MiB |", "|---|---|---|---|---|"]
        for q, r in exports.items():
            ratio = f"{r['export_s'] / f16:.2f}x" if f16 else "-"
            out.append(f"| {q} | {r['export_s']:.0f} | {ratio} | {r['gguf_gib']:.2f} | {r['peak_rss_mib']:.0f} |")
        out.append("")
    out += ["| engine / mode | load s | TTFT s | decode tokens/s | peak RSS MiB | speed vs llama.cpp "
            "| RSS vs llama.cpp | top ops of a decode step (share of op time) |", "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for mode, gguf_type in PAIRS:
        ours, theirs = results.get(f"glmtune-{mode}"), results.get(f"llamacpp-{gguf_type}")
        for label, r in ((f"llama.cpp {gguf_type}", theirs), (f"glmtune {mode}", ours)):
            if r is None:
                continue
            ratio = ["", ""]
            if r is ours and theirs is not None:
                speed, rss = r["tokens_per_s"] / theirs["tokens_per_s"], r["peak_rss_mib"] / theirs["peak_rss_mib"]
                ratio = [f"{speed:.2f}x", f"{rss:.2f}x"]
                verdicts.append(f"{mode}: speed {'met' if speed >= TARGET_SPEED else 'MISSED'} ({speed:.2f}x, "
                                f"target >= {TARGET_SPEED}x), RSS {'met' if rss <= TARGET_RSS else 'MISSED'} "
                                f"({rss:.2f}x, target <= {TARGET_RSS}x)")
            ops = ", ".join(f"{name} {share:.0%}" for name, share in r.get("top_ops", []))
            out.append(f"| {label} | {r['load_s']:.1f} | {r['ttft_s']:.1f} | {r['tokens_per_s']:.2f} "
                       f"| {r['peak_rss_mib']:.0f} | {ratio[0]} | {ratio[1]} | {ops} |")
    per_round = round_ratios(rounds) if rounds and len(rounds) > 1 else []
    return "\n".join(out + ([""] + verdicts if verdicts else []) + ([""] + per_round if per_round else []))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (time to first token)")
    parser.add_argument("--new-tokens", type=int, default=8, help="decoded tokens timed after the first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every side this many times, the order reversed each round; "
                        "each side's best counts")
    parser.add_argument("--checkpoint", help="a ChatGLM2 checkpoint folder (default: bench/fullsize.py's chatglm2-6b)")
    add_worker_arguments(parser, WORKERS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    if not LLAMACPP_PYTHON.is_file():
        raise SystemExit(f"{LLAMACPP_PYTHON} is absent: run scripts/get_llamacpp.sh first")
    if not args.checkpoint:
        from fullsize import write_layout

        args.checkpoint = str(write_layout("chatglm2-6b"))
    raw = argv if argv is not None else sys.argv[1:]
    forwarded = [a for a in raw if a not in ("--no-record",)]
    forwarded = [a for i, a in enumerate(forwarded)
                 if a != "--checkpoint" and (i == 0 or forwarded[i - 1] != "--checkpoint")]
    gguf_path(args, "f16").parent.mkdir(parents=True, exist_ok=True)
    first = plan(args)
    measured = [name for name in first if not name.startswith("export-")]
    schedule = [first] + [measured[::-1] if number % 2 else measured for number in range(1, args.rounds)]
    exports, rounds, began = {}, [], time.perf_counter()
    for names in schedule:
        rounds.append({})
        for name in names:
            result = run_child(args, name, forwarded)
            (exports if name.startswith("export-") else rounds[-1])[name] = result
            shown = {k: v for k, v in result.items() if k != "tokens"}
            print(f"{name}: {shown} ({time.perf_counter() - began:.0f} s so far)", flush=True)
    results = {**exports, **{name: best_of([r[name] for r in rounds]) for name in measured}}
    text = report(args, results, [{n: r[n] for n in sorted(r, key=measured.index)} for r in rounds])
    print("\n" + text)
    if not args.no_record:
        record("bench_fullsize_decode.py", text + f"\n\nwhole run {time.perf_counter() - began:.0f} s", raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
