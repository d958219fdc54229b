"""Where one full-size ChatGLM2-6B decode token's time goes on CPU (issue #12): the weight matmuls vs the rest.

bench_fullsize_decode.py gives tokens/s; this splits greedy decode steps (batch 1, after a `--prompt`-token
prompt, same random weights) of glmtune bf16 / int8 / int4 into sections — the four weight matmuls of each
layer, the output layer, embedding, norms, rotary tables and rotation, KV-cache append, attention, SwiGLU,
residual adds and the Python glue around them — each timed exclusively (a section's time leaves out the sections
it calls), from module hooks and wrapped functions. A second pass under torch.profiler lists the ops that take
the time and how much of a step runs outside any op (Python, dispatch). Each mode in its own child process:

    flock /tmp/glmtune-fullsize.lock .venv/bin/python bench/bench_fullsize_profile.py --only int4 --only bf16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from bench_fullsize_decode import prompt_ids
from results import add_worker_arguments, record, run_workers

MODES = {"bf16": 0, "int8": 8, "int4": 4}
# section -> the group it is reported under; matmuls first, then what the matmul kernels do not touch
MATMULS = {"query_key_value": "matmul: query_key_value", "dense": "matmul: attention dense",
           "dense_h_to_4h": "matmul: dense_h_to_4h", "dense_4h_to_h": "matmul: dense_4h_to_h"}
ORDER = [*MATMULS.values(), "output layer", "embedding", "norms (RMSNorm)",
         "rotary tables", "rotary (apply to q, k)", "KV-cache append", "attention (SDPA)", "attention (decode glue)",
         "attention module glue (split, reshape)", "SwiGLU (silu * up)", "block glue (residual adds)",
         "layer loop", "model glue (masks, positions, outputs)", "argmax + loop"]


class SectionTimer:
    """Exclusive wall time per section: a section entered inside another pauses the outer one's clock."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []

    def enter(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), 0.0])

    def leave(self) -> None:
        name, start, inner = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed - inner
        if self.stack:
            self.stack[-1][2] += elapsed


def _wrap(namespace: Any, attr: str, section: str, timer: SectionTimer, undo: list[Callable[[], Any]]) -> None:
    """Replace `namespace.attr` (a function looked up at call time) by a timed copy; absent names are skipped."""
    original: Callable | None = getattr(namespace, attr, None)
    if original is None:
        return
    undo.append(functools.partial(setattr, namespace, attr, original))

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        timer.enter(section)
        try:
            return original(*args, **kwargs)
        finally:
            timer.leave()

    setattr(namespace, attr, timed)


def _wrap_linear(namespace: Any, sections: dict[int, str], timer: SectionTimer,
                 undo: list[Callable[[], Any]]) -> None:
    """Time `namespace.decode_linear(layer, x)` under the section named for that layer (by object id)."""
    original = namespace.decode_linear
    undo.append(functools.partial(setattr, namespace, "decode_linear", original))

    @functools.wraps(original)
    def timed(layer: Any, x: Any) -> Any:
        timer.enter(sections.get(id(layer), "other linear layers"))
        try:
            return original(layer, x)
        finally:
            timer.leave()

    namespace.decode_linear = timed


def instrument(model: Any, cache_type: type, timer: SectionTimer) -> Callable[[], None]:
    """Hooks on the modules and wrappers around the functions of a ChatGLM2 decode step, naming its sections;
    returns what takes them all off again."""
    import torch.nn.functional as F

    import glmtune.modeling.causal_lm as causal_lm
    import glmtune.modeling.chatglm2 as chatglm2
    import glmtune.modeling.chatglm2_layers as layers

    by_class = {layers.RMSNorm: "norms (RMSNorm)", layers.Embedding: "embedding",
                layers.SelfAttention: "attention module glue (split, reshape)", layers.MLP: "SwiGLU (silu * up)",
                layers.GLMBlock: "block glue (residual adds)", layers.GLMTransformer: "layer loop"}
    # code that calls its linear layers through glmtune.kernels.decode_linear routes a hooked nn.Linear to
    # torch's kernel (so a user's hooks still see the call): there the matmuls are timed by wrapping that function
    routed = getattr(layers, "decode_linear", None) is not None
    undo: list[Callable[[], Any]] = []
    matmuls: dict[int, str] = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        section = by_class.get(type(module))
        if ".layers." in name and leaf in MATMULS:
            section = matmuls[id(module)] = MATMULS[leaf]
            if routed:
                continue
        elif name in ("", "transformer"):
            section = "model glue (masks, positions, outputs)"
        if section is None:
            continue
        undo.append(module.register_forward_pre_hook(lambda _m, _a, s=section: timer.enter(s)).remove)
        undo.append(module.register_forward_hook(lambda _m, _a, _o: timer.leave()).remove)
    if routed:
        _wrap_linear(layers, matmuls, timer, undo)
    _wrap(causal_lm, "project_to_vocab", "output layer", timer, undo)
    _wrap(chatglm2, "rotary_tables", "rotary tables", timer, undo)
    _wrap(layers, "apply_rotary", "rotary (apply to q, k)", timer, undo)
    _wrap(layers, "decode_attention", "attention (decode glue)", timer, undo)
    _wrap(F, "scaled_dot_product_attention", "attention (SDPA)", timer, undo)
    _wrap(cache_type, "update", "KV-cache append", timer, undo)

    def remove() -> None:
        for action in reversed(undo):
            action()

    return remove


def profile_mode(args: argparse.Namespace, bits: int) -> dict[str, Any]:
    """Load, prefill, then `--tokens` plain decode steps, as many timed by section, as many under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import glmtune

    torch.set_num_threads(args.threads)
    model = glmtune.load_model(args.checkpoint, dtype="bfloat16", quantization_bit=bits or None).eval()
    timer = SectionTimer()
    with torch.no_grad():
        model(input_ids=torch.tensor([[64790]]))  # warm-up: weights resident, kernel layouts built
        out = model(input_ids=torch.tensor([prompt_ids(args.prompt)]), use_cache=True, logits_to_keep=1)
        state = {"token": out.logits[:, -1].argmax(-1, keepdim=True), "past": out.past_key_values}

        def step() -> float:
            start = time.perf_counter()
            timer.enter("argmax + loop")
            out = model(input_ids=state["token"], past_key_values=state["past"], use_cache=True)
            state["token"], state["past"] = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
            int(state["token"])
            timer.leave()
            return time.perf_counter() - start

        plain = [step() for _ in range(args.tokens)]
        timer.totals.clear()
        remove = instrument(model, type(state["past"]), timer)
        hooked = [step() for _ in range(args.tokens)]
        remove()
        sections = {name: seconds / args.tokens for name, seconds in timer.totals.items()}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = [step() for _ in range(args.tokens)]
    ops = [(e.key, e.self_cpu_time_total / 1e6 / args.tokens, e.count / args.tokens) for e in prof.key_averages()]
    ops.sort(key=lambda op: -op[1])
    return {"plain_s": statistics.median(plain), "hooked_s": sum(hooked) / args.tokens, "sections": sections,
            "profiled_s": sum(profiled) / args.tokens, "in_ops_s": sum(op[1] for op in ops),
            "ops_per_token": sum(op[2] for op in ops), "top_ops": ops[:args.top_ops]}


WORKERS = {mode: functools.partial(profile_mode, bits=bits) for mode, bits in MODES.items()}


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    """One section table across the modes (ms per token, share of the hooked step), then each mode's top ops."""
    modes = list(results)
    out = [f"ChatGLM2 checkpoint {args.checkpoint} (random weights), batch 1, {args.threads} threads, decode "
           f"steps after a {args.prompt}-token prompt; {args.tokens} steps each: plain, timed by section (exclusive "
           "wall time: module hooks + wrapped functions), under torch.profiler. ms per token (share of the step).", "",
           "| section | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    names = ORDER + sorted({n for r in results.values() for n in r["sections"]} - set(ORDER))

    def cell(mode: str, seconds: float) -> str:
        return f"{seconds * 1e3:.1f} ({seconds / results[mode]['hooked_s']:.0%})"

    for name in names:
        if any(name in r["sections"] for r in results.values()):
            cells = (cell(m, results[m]["sections"].get(name, 0.0)) for m in modes)
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = {"all four weight matmuls": lambda r: sum(r["sections"].get(s, 0.0) for s in MATMULS.values()),
            "everything but the weight matmuls": lambda r: r["hooked_s"] - sum(
                r["sections"].get(s, 0.0) for s in MATMULS.values()),
            "of it, not matmul nor output layer": lambda r: r["hooked_s"] - sum(
                r["sections"].get(s, 0.0) for s in [*MATMULS.values(), ORDER[4]])}
    for label, value in rows.items():
        out.append(f"| **{label}** | " + " | ".join(cell(m, value(results[m])) for m in modes) + " |")
    out.append("| step with hooks (mean) | " + " | ".join(f"{results[m]['hooked_s'] * 1e3:.1f}" for m in modes) + " |")
    out.append("| step without hooks (median) | " + " | ".join(
        f"{results[m]['plain_s'] * 1e3:.1f} ({1 / results[m]['plain_s']:.2f} tok/s)" for m in modes) + " |")
    for mode in modes:
        r = results[mode]
        outside = r["profiled_s"] - r["in_ops_s"]
        out += ["", f"{mode} under torch.profiler: step {r['profiled_s'] * 1e3:.1f} ms, {r['ops_per_token']:.0f} op "
                f"calls per token (nested ones included), {outside * 1e3:.1f} ms "
                f"({outside / r['profiled_s']:.0%}) outside any op "
                "(Python, dispatch, profiler); ops by self time:", "",
                "| op | ms/token | calls/token |", "|---|---|---|"]
        out += [f"| {key} | {seconds * 1e3:.1f} | {calls:.0f} |" for key, seconds, calls in r["top_ops"]]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens before the profiled steps")
    parser.add_argument("--tokens", type=int, default=6, help="decode steps in each of the three passes")
    parser.add_argument("--top-ops", type=int, default=12, help="ops listed per mode")
    parser.add_argument("--checkpoint", help="a ChatGLM2 checkpoint folder (default: bench/fullsize.py's chatglm2-6b)")
    add_worker_arguments(parser, WORKERS)
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.prompt < 2:
        parser.error("--tokens must be >= 1 and --prompt >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return 0
    if not args.checkpoint:
        from fullsize import write_layout

        args.checkpoint = str(write_layout("chatglm2-6b"))
    raw = argv if argv is not None else sys.argv[1:]
    forwarded = [a for i, a in enumerate(raw) if a != "--no-record" and not a.startswith("--only")
                 and not (i and raw[i - 1] == "--only")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = run_workers(__file__, args.only or ["bf16", "int8", "int4"],
                          [*forwarded, "--checkpoint", args.checkpoint], env)
    text = report(args, results)
    print("\n" + text)
    if not args.no_record:
        record("bench_fullsize_profile.py", text, raw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
