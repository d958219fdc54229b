"""`train(prepare(spec, workdir))`: one training run from a `GLMFineTune` spec, single process or distributed.

`seam.prepare` makes the base model, the records and the plan once per work dir; `train` here runs the steps.

Engine choice: a small explicit loop (`loop.fit` / `loop.validate`) over torch DDP or
`deepspeed.initialize`, not transformers' Trainer. Every step's data is a pure function of (seed, step),
the loss is normalised by the step's global token count, and the NaN guard decides before the optimizer
runs — which is what makes kill -9 resume bit-identical and DDP/ZeRO match single-process training.

Across nodes (see `distributed.work_dir_roles`): the base model and the records are prepared once per
work dir, by the local rank 0 of the lowest node that sees it, and the others wait on a marker in their
own work dir. Node-local work dirs therefore each get their own (byte-identical, deterministic) build,
which `data.cache` makes a download instead of a rebuild; a shared work dir is built once, by node 0.
Checkpoints follow the same rule: the writer of each work dir saves the replicated state plus every rank's
RNG, so each node resumes from its own copy (or the mirror, written by global rank 0) at the newest step
every node has. ZeRO shards optimizer state per rank and every rank reads all shards on resume, so ZeRO
over several nodes fails at start unless they share the work dir.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmtune import storage
from glmtune.errors import GlmtuneError, InvalidInputError
from glmtune.fingerprint import base_fingerprint
from glmtune.modeling.hf_compat import enable_activation_checkpointing
from glmtune_trainer import checkpoint as ckpt
from glmtune_trainer.distributed import (
    Topology,
    WorkDirRoles,
    barrier,
    device_for,
    gather_objects,
    per_directory,
    process_group,
    read_topology,
)
from glmtune_trainer.engine import CausalLMLoss, DeepSpeedEngine, Engine, PlainEngine, deepspeed_config
from glmtune_trainer.export import ExportResult, export
from glmtune_trainer.guard import NonFiniteGuard
from glmtune_trainer.loop import BatchSource, LoopPlan, LoopState, fit
from glmtune_trainer.methods import (
    adalora_state,
    adalora_update,
    apply_method,
    load_adalora_state,
    load_overrides,
)
from glmtune_trainer.metrics import MetricsLogger
from glmtune_trainer.model_setup import load_training_model
from glmtune_trainer.optim import build_offload_optimizer, build_optimizer, build_scheduler, parameter_groups
from glmtune_trainer.seam import EventCallback, Prepared, prepare


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    checkpoint_dir: Path
    metrics: dict[str, Any]
    export: ExportResult | None


class _ReportingMetrics(MetricsLogger):
    """The run's metrics sinks plus the caller's `on_event`, which hears every record rank 0 logs."""

    def __init__(self, *args: Any, on_event: EventCallback | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_event = on_event

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        super().log(kind, step, values)
        if self.enabled and self.on_event is not None:
            self.on_event(kind, step, dict(values))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (data order and model init depend on them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resume_from(cp: Any, root: Path, topology: Topology, roles: WorkDirRoles) -> Path | None:
    """This rank's checkpoint to resume from: the same step for every node, each read from its own work dir."""
    if cp.resume == "never":
        return None
    if cp.resume != "auto":
        return Path(per_directory(topology, roles, lambda: str(ckpt.resolve_location(cp.resume))))
    offers = [set(steps) for steps in gather_objects(ckpt.available_steps(root, cp.mirror_uri) if roles.writer
                                                     else None) if steps is not None]
    common = set.intersection(*offers)
    if not common:
        return None
    step = max(common)
    return Path(per_directory(topology, roles, lambda: str(ckpt.materialise(root, step, cp.mirror_uri))))


def _run_description(spec: Any, base: dict[str, Any], total_steps: int, fingerprint: str | None) -> dict[str, Any]:
    """run.json: how to rebuild the trained model from its base (read by export), and the fingerprint of that base
    (export refuses to rebuild over a base whose files have changed since)."""
    model = spec.spec.model
    return {
        "spec_name": spec.metadata.name, "base_model": base["path"], "base_uri": model.uri or base["path"],
        "base_fingerprint": fingerprint,
        "family": base["family"], "template": base["template"], "dtype": base["dtype"],
        "method": spec.spec.method.model_dump(mode="json"), "total_steps": total_steps,
        "quantization_bits": model.quantization.bits if model.quantization else 0,
        # Which layers quantized the base: serving must rebuild the same ones (QLoRA NF4 is not glmtune int4).
        "quantization_backend": model.quantization.backend if model.quantization else None,
    }


def _build_engine(spec: Any, model: torch.nn.Module, topology: Topology, device: torch.device) -> Engine:
    training = spec.spec.training
    ds = training.deepspeed
    groups = parameter_groups(model, training.weight_decay)
    if ds is not None and ds.offload_optimizer:
        optimizer, deepspeed_native = build_offload_optimizer(training.optimizer, groups, training.learning_rate)
    else:
        optimizer, deepspeed_native = build_optimizer(training.optimizer, groups, training.learning_rate), False
    if ds is None:
        model.to(device)
        return PlainEngine(CausalLMLoss(model), optimizer, training.precision, training.max_grad_norm, device,
                           topology.distributed)
    config = deepspeed_config(
        ds.stage, micro_batch_size=training.batch_size, gradient_accumulation_steps=training.gradient_accumulation_steps,
        world_size=topology.world_size, max_grad_norm=training.max_grad_norm, precision=training.precision,
        offload_optimizer=ds.offload_optimizer, offload_params=ds.offload_params,
    )
    if ds.offload_optimizer and not deepspeed_native:
        config["zero_force_ds_cpu_optimizer"] = False  # DeepSpeed's documented switch for a client optimizer
    return DeepSpeedEngine(CausalLMLoss(model, recompute=ds.stage != 3), optimizer, config)


def train_spec(spec: Any, workdir: Path, source: BatchSource | None = None, stop_after: int | None = None,
               on_event: EventCallback | None = None) -> TrainResult:
    """`prepare(spec, workdir)` then `train(...)` on it: a whole run in one call (tests, library users).

    `source` replaces the records built from `spec.data`; see `train` for `stop_after` and `on_event`.
    """
    return train(prepare(spec, workdir, source=source), stop_after=stop_after, on_event=on_event)


def train(prepared: Prepared, stop_after: int | None = None, on_event: EventCallback | None = None) -> TrainResult:
    """Train what `prepare` made ready, with checkpoints and logs under its work dir; export on completion.

    `stop_after` ends early after that many steps of this call without exporting (simulates preemption).
    `on_event(kind, step, values)` hears, on global rank 0, every record the run logs ("train", "eval",
    "summary") and the finished export ("export": uri and kind).
    """
    topology = read_topology()
    if prepared.topology != topology:
        raise GlmtuneError(f"this run was prepared for {prepared.topology.world_size} process(es) as rank "
                           f"{prepared.topology.rank}, but this process is rank {topology.rank} of "
                           f"{topology.world_size}: prepare it in the process that trains it")
    # DeepSpeed needs a process group even alone: a lone process gets a world of one (see process_group).
    with process_group(topology, single_process=prepared.spec.spec.training.deepspeed is not None):
        return _train(prepared, stop_after, on_event)


def _train(prepared: Prepared, stop_after: int | None, on_event: EventCallback | None) -> TrainResult:
    spec, workdir, topology, roles = prepared.spec, prepared.workdir, prepared.topology, prepared.roles
    base, source, total = prepared.base, prepared.source, prepared.total_steps
    _quiet_bitsandbytes(spec)
    device = device_for(topology)
    training = spec.spec.training
    # Seeded again here so the model's initialisation does not depend on what ran since `prepare`.
    seed_everything(training.seed)
    model = load_training_model(base, load_overrides(spec.spec.method))
    model = apply_method(model, spec.spec.method, total)
    if training.gradient_checkpointing:
        enable_activation_checkpointing(model)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # master weights in fp32 whatever the base dtype
    engine = _build_engine(spec, model, topology, device)
    scheduler = _scheduler(training, engine, total)
    guard = NonFiniteGuard(max_consecutive=training.max_bad_steps, precision=training.precision)
    root = workdir / "checkpoints"
    # Only the writers save run.json; hashing the base (cached next to it after the first time) is theirs alone.
    run_info = _run_description(spec, base, total, base_fingerprint(base["path"]) if roles.writer else None)
    state = LoopState()
    cp = training.checkpoint
    resume_from = _resume_from(cp, root, topology, roles)
    if resume_from:
        state = _resume(Path(resume_from), engine, scheduler, guard, topology)
    metrics = _ReportingMetrics(workdir / "logs", total, state.step, enabled=topology.is_main, on_event=on_event)

    def save(loop_state: LoopState) -> None:
        _save(root, loop_state, engine, scheduler, guard, topology, roles, run_info, cp)

    try:
        state = fit(engine, source, scheduler, guard,
                    LoopPlan(total, prepared.steps_per_epoch, training.gradient_accumulation_steps,
                             topology.world_size, training.log_every_steps, training.evaluation.every_epoch,
                             cp.every_steps, cp.every_minutes),
                    state, metrics, device, save,
                    after_update=(lambda step: adalora_update(engine.model, step))
                    if spec.spec.method.name == "adalora" else None,
                    stop_after=stop_after, extra_eval=_generation_eval(spec, engine, source, base, device))
    finally:
        metrics.close()
    final = root / ckpt.step_dir_name(state.step)
    summary = {"step": state.step, "loss": state.last_loss, "eval_loss": state.eval_loss,
               "skipped_steps": guard.skipped_total, "tokens": state.tokens}
    exported = None
    if state.step >= total and topology.is_main:
        out = spec.spec.output
        exported = export(final, out.uri, out.export, out.bits)
        if on_event is not None:
            on_event("export", state.step, {"uri": exported.uri, "kind": exported.kind})
    barrier()
    return TrainResult(checkpoint_dir=final, metrics=summary, export=exported)


def _quiet_bitsandbytes(spec: Any) -> None:
    """Keep bitsandbytes' CPU 4-bit kernel notice away from runs that use no 4-bit bitsandbytes layers.

    peft imports bitsandbytes whenever it is installed (for every LoRA / AdaLoRA run), and on CPUs with
    AVX512-BF16 its import logs "Failed to load CPU gemm_4bit_forward from kernels-community", a warning
    about an optional kernel for 4-bit layers. Only a 4-bit bitsandbytes run keeps that warning.
    """
    quant = spec.spec.model.quantization
    if quant is None or quant.backend != "bitsandbytes" or quant.bits != 4:
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _generation_eval(spec: Any, engine: Any, source: Any, base: dict[str, Any], device: torch.device) -> Any:
    """BLEU-4 / Rouge-L on the held-out split when `evaluation.generationMetrics` asks for them."""
    training = spec.spec.training
    if not training.evaluation.generation_metrics:
        return None
    from glmtune.tokenization import load_tokenizer
    from glmtune_trainer.genmetrics import generation_scores, prompts_and_answers

    tokenizer = load_tokenizer(base["path"])
    pairs = prompts_and_answers(source.eval_records())
    return lambda: generation_scores(engine.model, tokenizer, base["template"], pairs, device)


def _scheduler(training: Any, engine: Engine, total: int) -> Any:
    warmup = training.warmup_steps if training.warmup_steps is not None else int(total * (training.warmup_ratio or 0))
    return build_scheduler(training.scheduler, engine.client_optimizer, warmup, total)


def _save(root: Path, state: LoopState, engine: Engine, scheduler: Any, guard: NonFiniteGuard, topology: Topology,
          roles: WorkDirRoles, run_info: dict[str, Any], cp: Any) -> None:
    """Write checkpoint `state.step` atomically (all ranks take part; each work dir's writer finalises it)."""
    tmp = ckpt.prepare_tmp_dir(root, state.step, roles.writer)
    barrier()
    weights = engine.trained_fp32_state()
    rngs = gather_objects(ckpt.rng_state())
    if roles.writer:
        ckpt.save_weights(tmp / ckpt.WEIGHTS_FILE, weights)
    engine.save(tmp, roles.writer)
    if roles.writer:
        for rank, rng in enumerate(rngs):
            ckpt.save_rng(tmp, rank, rng)
        torch.save({"scheduler": scheduler.state_dict(), "adalora": adalora_state(engine.model)}, tmp / "scheduler.pt")
        storage.atomic_write_json(tmp / ckpt.RUN_FILE, {**run_info, "step": state.step})
        storage.atomic_write_json(tmp / ckpt.STATE_FILE, {**state.to_json(), "guard": guard.state_dict(),
                                                "world_size": topology.world_size})
    barrier()
    if roles.writer:
        ckpt.finalize(root, tmp, state.step, cp.keep_last, cp.mirror_uri if topology.is_main else None)
    barrier()


def _resume(directory: Path, engine: Engine, scheduler: Any, guard: NonFiniteGuard, topology: Topology) -> LoopState:
    """Load everything `_save` wrote; the RNG comes last so nothing after it consumes randomness."""
    saved = ckpt.read_state(directory)
    if saved.get("world_size", 1) != topology.world_size and engine.partitioned_state:
        raise InvalidInputError(f"checkpoint was written by {saved['world_size']} processes; ZeRO state needs "
                                f"the same number, not {topology.world_size}", where=str(directory))
    engine.load(directory)
    extra = torch.load(directory / "scheduler.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    load_adalora_state(engine.model, extra.get("adalora"))
    guard.load_state_dict(saved.get("guard", {}))
    state = LoopState.from_json(saved)
    ckpt.load_rng(directory, topology.rank)
    return state
