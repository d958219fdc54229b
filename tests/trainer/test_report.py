"""report.html of a real (tiny) `glmtune run`: its numbers are the metrics log's, its curves render in headless
Chromium, `glmtune report WORKDIR` rebuilds it with the export's files, and bad inputs name their place."""

from __future__ import annotations

import argparse
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from browser import browser, page  # noqa: F401  (fixtures)
from glmtune_trainer.metrics import MetricsLogger, read_metrics
from glmtune_trainer.report import REPORT_FILE, collect, register, summary_numbers, write_report

from glmtune import storage
from glmtune.errors import InvalidInputError

from .conftest import spec_mapping


@pytest.fixture(scope="module")
def finished_run(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(work dir, export dir) of `glmtune run` on the quickstart data: LoRA, evaluated after each epoch."""
    from glmtune_app.pipeline import run_pipeline

    from glmtune.spec import spec_from_mapping

    root = tmp_path_factory.mktemp("report-run")
    mapping = spec_mapping(tiny_model("v2"), root / "export", "lora", evaluation={"everyEpoch": True})
    mapping["spec"]["data"]["evalSplit"] = 0.2
    result = run_pipeline(spec_from_mapping(mapping, "test"), root / "work")
    return result.workdir, Path(result.export_uri)


class _Cells(HTMLParser):
    """The report's `data-metric` cells (name → shown text) and its images' ids."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.metrics: dict[str, str] = {}
        self.images: list[str] = []
        self._open: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self._open = found.get("data-metric")
        if tag == "img":
            self.images.append(str(found.get("id")))

    def handle_data(self, data: str) -> None:
        if self._open:
            self.metrics[self._open] = data
            self._open = None


def _shown(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


def _check_logged_numbers(shown: dict[str, str], workdir: Path) -> None:
    """Every headline number agrees with logs/metrics.jsonl to the digits shown."""
    train, evals = read_metrics(workdir / "logs", "train"), read_metrics(workdir / "logs", "eval")
    summary = read_metrics(workdir / "logs", "summary")[-1]
    assert _shown(shown["final_loss"]) == pytest.approx(train[-1]["loss"], abs=5e-5)
    assert _shown(shown["final_eval_loss"]) == pytest.approx(evals[-1]["eval_loss"], abs=5e-5)
    assert _shown(shown["best_eval_loss"]) == pytest.approx(min(e["eval_loss"] for e in evals), abs=5e-5)
    assert _shown(shown["final_perplexity"]) == pytest.approx(evals[-1]["perplexity"], abs=5e-3)
    assert _shown(shown["steps_per_s"]) == pytest.approx(summary["steps_per_s"], abs=5e-4)
    assert float(shown["final_lr"]) == pytest.approx(train[-1]["lr"], rel=1e-3)
    state = json.loads(sorted((workdir / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert _shown(shown["trained_tokens"]) == state["tokens"]


@pytest.mark.slow
def test_report_shows_the_logged_numbers_and_its_curves_render_in_chromium(finished_run: tuple[Path, Path],
                                                                          page: Any, tmp_path: Path) -> None:  # noqa: F811
    workdir, export_dir = finished_run
    out = write_report(workdir, tmp_path / REPORT_FILE, export_dir=export_dir)
    page.page.goto(out.as_uri())
    sizes = page.page.eval_on_selector_all(
        "img", "images => images.map(i => [i.id, i.complete, i.naturalWidth, i.naturalHeight])")
    page.shot("report")
    assert {size[0] for size in sizes} == {"fig-loss", "fig-eval_loss", "fig-lr", "fig-throughput", "fig-lengths"}
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in sizes), sizes
    shown = page.page.eval_on_selector_all(
        "[data-metric]", "cells => Object.fromEntries(cells.map(c => [c.dataset.metric, c.textContent]))")
    _check_logged_numbers(shown, workdir)
    assert not page.errors


def test_report_data_section_matches_the_built_records(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    workdir, export_dir = finished_run
    stats = json.loads((workdir / "records" / "manifest.json").read_text())["stats"]
    shown = _Cells(write_report(workdir, tmp_path / REPORT_FILE).read_text()).metrics
    assert _shown(shown["samples"]) == stats["samples"]
    assert _shown(shown["packing_efficiency"]) == pytest.approx(100 * stats["padding_efficiency_pad_to_max"], abs=.05)
    assert _shown(shown["padding_efficiency"]) == pytest.approx(100 * stats["padding_efficiency"], abs=.05)
    assert shown["truncated"].startswith(f"{stats['truncated']} ({stats['truncated_share']:.1%})")
    assert shown["method"] == "lora"


def test_report_counts_the_trained_parameters_against_the_whole_model(finished_run: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    from glmtune_trainer.checkpoint import load_weights
    from glmtune_trainer.export import read_run

    from glmtune.modeling import load_model

    workdir, _ = finished_run
    checkpoint = sorted((workdir / "checkpoints").glob("step-*"))[-1]
    trained = sum(t.numel() for t in load_weights(checkpoint / "model.safetensors").values())
    base = sum(p.numel() for p in load_model(read_run(checkpoint)["base_model"]).parameters())
    shown = _Cells(write_report(workdir, tmp_path / REPORT_FILE).read_text()).metrics["trainable"]
    assert shown == f"{trained:,} of {base + trained:,} ({trained / (base + trained):.3%})"


def test_glmtune_report_rebuilds_the_report_in_the_workdir_with_the_exports_files(
        finished_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    workdir, export_dir = finished_run
    parser = argparse.ArgumentParser(prog="glmtune")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(workdir)])
    assert args.func(args) == 0
    report = workdir / REPORT_FILE
    assert f"wrote {report}" in capsys.readouterr().out
    text = report.read_text(encoding="utf-8")
    # Without --export it finds the run's export through spec.yaml (written by `glmtune run`).
    for name, entry in storage.read_manifest(export_dir)["files"].items():
        assert name in text and entry["sha256"] in text
    assert report.stat().st_mode & 0o777 == 0o644
    assert not [p for p in workdir.iterdir() if p.name.startswith(".") and "report" in p.name]  # no temp left
    _check_logged_numbers(_Cells(text).metrics, workdir)


def test_a_resumed_run_reports_each_step_once_with_its_replayed_values(tmp_path: Path) -> None:
    first = MetricsLogger(tmp_path / "logs", total_steps=3)
    for step in (1, 2, 3):
        first.log("train", step, {"loss": 3.0 - step, "lr": 0.1})
    first.close()
    resumed = MetricsLogger(tmp_path / "logs", total_steps=3, start_step=2)  # killed after step 2's checkpoint
    resumed.log("train", 3, {"loss": 0.25, "lr": 0.1})
    resumed.log("summary", 3, {"steps_per_s": 2.0, "skipped_steps": 0, "peak_memory_bytes": 3 * 2**30,
                                  "peak_memory_device": "cuda:0"})
    resumed.close()
    data = collect(tmp_path)
    assert [r["step"] for r in data["log"]["train"]] == [1, 2, 3]
    numbers = summary_numbers(data)
    assert numbers["final_loss"] == 0.25 and numbers["peak_memory_bytes"] == 3 * 2**30
    shown = _Cells(write_report(tmp_path, tmp_path / REPORT_FILE).read_text()).metrics
    assert shown["peak_memory"] == "3.00 GiB (cuda:0)"
    assert shown["final_loss"] == "0.2500"


def test_a_folder_without_a_run_is_an_input_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(str(tmp_path))):
        write_report(tmp_path, tmp_path / REPORT_FILE)
    assert not (tmp_path / REPORT_FILE).exists()


def test_a_damaged_metrics_line_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tr\n')
    with pytest.raises(InvalidInputError, match=r"metrics\.jsonl:2"):
        write_report(tmp_path, tmp_path / REPORT_FILE)


def test_a_report_written_into_an_export_before_its_manifest_lists_every_file_the_manifest_then_checks(
        finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    """What the trainer's export does: export files, then report.html, then the manifest (which lists it)."""
    from glmtune_trainer.export import write_export
    from glmtune_trainer.report import run_workdir

    workdir, _ = finished_run
    checkpoint = sorted((workdir / "checkpoints").glob("step-*"))[-1]
    assert run_workdir(checkpoint) == workdir.resolve()
    staging = tmp_path / "export"
    staging.mkdir()
    write_export(checkpoint, staging, "merged", None)
    write_report(run_workdir(checkpoint), staging / REPORT_FILE, checkpoint_dir=checkpoint, export_dir=staging)
    manifest = storage.write_manifest(staging)
    assert REPORT_FILE in manifest["files"]
    text = (staging / REPORT_FILE).read_text(encoding="utf-8")
    listed = re.findall(r"<tr><td><code>([^<]+)</code></td><td class=num>([\d,]+)</td>", text)
    assert {name: int(size.replace(",", "")) for name, size in listed} == {
        name: entry["size"] for name, entry in manifest["files"].items() if name != REPORT_FILE}
    _check_logged_numbers(_Cells(text).metrics, workdir)


def test_the_runs_own_export_carries_its_report_with_the_peak_memory(finished_run: tuple[Path, Path]) -> None:
    """`glmtune run` exports report.html inside the export (listed in its manifest, so it travels to S3 and
    verifies), and the trainer logged the run's peak memory that the report shows."""
    workdir, export_dir = finished_run
    assert REPORT_FILE in storage.read_manifest(export_dir)["files"]
    summary = read_metrics(workdir / "logs", "summary")[-1]
    assert summary["peak_memory_bytes"] > 0 and summary["peak_memory_device"] == "cpu (peak RSS)"
    shown = _Cells((export_dir / REPORT_FILE).read_text(encoding="utf-8")).metrics
    assert shown["peak_memory"].endswith("(cpu (peak RSS))") and "not recorded" not in shown["peak_memory"]
