"""Optimizers, schedules and ZeRO configs named in the spec build and work; the `train` command runs a spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from glmtune_trainer.engine import deepspeed_config
from glmtune_trainer.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler, parameter_groups

from .conftest import spec_mapping


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_a_simple_loss(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 1))
    optimizer = build_optimizer(name, parameter_groups(model, 0.01), lr=1e-2)
    inputs, target = torch.randn(32, 64), torch.randn(32, 1)
    first = None
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        first = first if first is not None else float(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss) < first


def test_weight_decay_skips_biases_and_norm_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedules_warm_up_then_follow_their_shape(name: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(name, optimizer, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0)
    assert (lrs[-1] == pytest.approx(1.0)) if name == "constant" else lrs[-1] < 0.5


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedules_equal_transformers_get_scheduler_step_for_step(name: str) -> None:
    from transformers import get_scheduler

    theirs_name = {"constant": "constant_with_warmup", "cosineWithRestarts": "cosine_with_restarts"}.get(name, name)
    ours_optimizer, theirs_optimizer = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3) for _ in "ab")
    ours = build_scheduler(name, ours_optimizer, warmup_steps=3, total_steps=17, num_cycles=2)
    theirs = get_scheduler(theirs_name, theirs_optimizer, num_warmup_steps=3, num_training_steps=17,
                           scheduler_specific_kwargs={"num_cycles": 2} if name == "cosineWithRestarts" else None)
    for _ in range(20):  # past the end too
        assert ours.get_last_lr() == theirs.get_last_lr()
        ours_optimizer.step()
        theirs_optimizer.step()
        ours.step()
        theirs.step()


def test_activation_checkpointing_is_enabled_without_deprecation_warnings(tiny_model) -> None:
    import warnings

    from glmtune.modeling import load_model
    from glmtune.modeling.hf_compat import enable_activation_checkpointing

    model = load_model(tiny_model("v2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.23+ warns on the old gradient_checkpointing_enable
        enable_activation_checkpointing(model)
    assert [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")] == [True]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_zero_configs_are_completed_from_the_spec(stage: int) -> None:
    config = deepspeed_config(stage, micro_batch_size=2, gradient_accumulation_steps=4, world_size=8,
                              max_grad_norm=0.5, precision="bf16", offload_optimizer=stage > 0,
                              offload_params=stage == 3)
    assert config["zero_optimization"]["stage"] == stage
    assert (config["train_batch_size"], config["gradient_clipping"], config["bf16"]["enabled"]) == (64, 0.5, True)
    assert ("offload_optimizer" in config["zero_optimization"]) == (stage > 0)
    assert ("offload_param" in config["zero_optimization"]) == (stage == 3)


def test_train_command_applies_overrides_and_writes_logs(tiny_model, tmp_path: Path, capsys) -> None:
    from glmtune_app.cli import main

    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(yaml.safe_dump(spec_mapping(tiny_model("v2"), tmp_path / "export", "lora", epochs=50)))
    code = main(["train", str(spec_file), "--set", "training.maxSteps=2", "--workdir", str(tmp_path / "w")])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "w" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_steps] == [1, 2]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps"} <= set(train_steps[0])
    assert (tmp_path / "export" / "glmtune-manifest.json").is_file()
    # TensorBoard holds every number of the JSON log, under "<kind>/<name>" at the same step (as float32).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "w" / "logs" / "tensorboard"))
    board.Reload()
    expected = {(f"{r['kind']}/{key}", r["step"]): value for r in records for key, value in r.items()
                if key not in ("kind", "step", "time") and isinstance(value, int | float)}
    scalars = {(tag, event.step): event.value for tag in board.Tags()["scalars"] for event in board.Scalars(tag)}
    assert {"train/loss", "train/lr", "train/grad_norm", "summary/steps_per_s"} <= {tag for tag, _ in expected}
    assert scalars == pytest.approx(expected, rel=1e-6)


def test_train_command_names_the_bad_field_and_exits_2(tiny_model, tmp_path: Path, capsys) -> None:
    from glmtune_app.cli import main

    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(yaml.safe_dump(spec_mapping(tiny_model("v2"), tmp_path / "export", "lora")))
    assert main(["train", str(spec_file), "--set", "training.optimizer=sgd", "--workdir", str(tmp_path)]) == 2
    assert "spec.training.optimizer" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_computes_in_half_and_keeps_fp32_master_weights(make_spec, tmp_path: Path, method: str,
                                                                        precision: str) -> None:
    from glmtune_trainer.checkpoint import load_weights
    from glmtune_trainer.metrics import read_metrics
    from glmtune_trainer.run import train_spec

    settings = {"dropout": 0.0} if method == "lora" else None
    result = train_spec(make_spec(method, maxSteps=2, precision=precision, method_settings=settings), tmp_path / "half")
    train_spec(make_spec(method, maxSteps=2, precision="fp32", method_settings=settings), tmp_path / "fp32")
    weights = load_weights(result.checkpoint_dir / "model.safetensors")
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    # Step 1's loss comes from the untouched model: only the precision of the forward can change it. It must
    # differ from fp32 (a run that ignored `precision` gives the same bits) by half-precision rounding only.
    half, full = (read_metrics(tmp_path / run / "logs", "train")[0]["loss"] for run in ("half", "fp32"))
    assert half != full
    assert half == pytest.approx(full, rel=2e-2)


def test_time_based_checkpoints_are_due_after_the_interval() -> None:
    import time

    from glmtune_trainer.loop import LoopPlan, _checkpoint_due

    plan = LoopPlan(total_steps=100, steps_per_epoch=50, accumulation=1, world_size=1, log_every=1,
                    evaluate_each_epoch=False, checkpoint_every_steps=None, checkpoint_every_minutes=1.0)
    now = time.monotonic()
    assert not _checkpoint_due(plan, 3, False, now, torch.device("cpu"))
    assert _checkpoint_due(plan, 3, False, now - 61, torch.device("cpu"))
    assert _checkpoint_due(plan, 50, True, now, torch.device("cpu"))  # epoch end


def test_gradient_checkpointing_gives_the_same_loss_and_weights(make_spec, tmp_path: Path) -> None:
    from glmtune_trainer.checkpoint import load_weights
    from glmtune_trainer.run import train_spec

    plain = train_spec(make_spec("lora", maxSteps=2, method_settings={"dropout": 0.0}), tmp_path / "plain")
    recomputed = train_spec(make_spec("lora", maxSteps=2, method_settings={"dropout": 0.0}, gradientCheckpointing=True),
                       tmp_path / "gc")
    assert recomputed.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-5)
    a = load_weights(plain.checkpoint_dir / "model.safetensors")
    b = load_weights(recomputed.checkpoint_dir / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
