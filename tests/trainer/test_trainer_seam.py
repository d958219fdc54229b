"""The trainer's seam: `prepare(spec, workdir)` makes the run ready once, `train(prepared, on_event=...)` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from glmtune_trainer.metrics import read_metrics
from glmtune_trainer.run import train
from glmtune_trainer.seam import prepare

from glmtune.errors import GlmtuneError


def test_prepare_then_train_reports_every_logged_record_and_the_export(make_spec, tmp_path: Path) -> None:
    spec = make_spec("lora", maxSteps=3)
    heard: list[tuple[str, int, dict]] = []
    prepared = prepare(spec, tmp_path / "run", on_event=lambda kind, step, values: heard.append((kind, step, values)))
    assert [kind for kind, _, _ in heard] == ["model"] and Path(heard[0][2]["path"]).is_dir()
    assert prepared.total_steps == 3 and prepared.records == tmp_path / "run" / "records"
    assert not prepared.records_reused and prepared.records_stats()["samples"] > 0

    heard.clear()
    result = train(prepared, on_event=lambda kind, step, values: heard.append((kind, step, values)))
    logged = read_metrics(tmp_path / "run" / "logs", "train")
    assert [(step, values["loss"]) for kind, step, values in heard if kind == "train"] == [
        (record["step"], record["loss"]) for record in logged]
    assert heard[-1] == ("export", 3, {"uri": result.export.uri, "kind": result.export.kind})


def test_a_second_prepare_reuses_the_records(make_spec, tmp_path: Path) -> None:
    spec = make_spec("lora", maxSteps=1)
    first = prepare(spec, tmp_path / "run")
    again = prepare(spec, tmp_path / "run")
    assert not first.records_reused and again.records_reused
    assert again.records_stats() == first.records_stats()


def test_a_run_prepared_for_a_launch_of_several_processes_does_not_train_in_this_one(make_spec,
                                                                                    tmp_path: Path) -> None:
    prepared = prepare(make_spec("lora", maxSteps=1), tmp_path / "run", world_size=2)
    with pytest.raises(GlmtuneError, match="prepared for 2 process"):
        train(prepared)
