"""`glmtune run` on one machine: stages, output locations, reuse on re-run, S3 in and out, input errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from glmtune_app.cli import main
from pipeline_testkit import QUICKSTART_DATA, small_spec
from testkit import REPO_ROOT

from glmtune.errors import InvalidInputError
from glmtune.export_format import read_export_info
from glmtune.spec import load_spec_file, spec_from_mapping


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def test_run_builds_trains_and_exports_a_complete_model_under_the_workdir(spec_file, tmp_path: Path,
                                                                         capsys) -> None:
    from glmtune_app.pipeline import run_pipeline

    workdir = tmp_path / "run"
    result = run_pipeline(load_spec_file(spec_file()), workdir)
    export = workdir / "export"
    assert Path(result.export_uri) == export and result.export_kind == "full" and result.steps == 3
    assert read_export_info(export, require_complete=True).run == {"spec_name": "small", "steps": 3}
    manifest = json.loads((export / "glmtune-manifest.json").read_text())
    assert {"glmtune-export.json", "config.json"} <= set(manifest["files"])
    assert yaml.safe_load((workdir / "spec.yaml").read_text())["spec"]["output"]["uri"] == str(export)
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in err.splitlines() if line.startswith("[")] == [
        "[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "records built" in err
    assert f"glmtune chat {export}" in out and "/v1/chat/completions" in out


def test_rerun_reuses_the_base_model_records_and_finished_training(spec_file, tmp_path: Path, capsys) -> None:
    from glmtune_app.pipeline import run_pipeline

    spec = load_spec_file(spec_file())
    run_pipeline(spec, tmp_path / "run")
    weights = tmp_path / "run" / "base-model" / "config.json"
    first_base = weights.stat().st_mtime_ns
    capsys.readouterr()
    again = run_pipeline(spec, tmp_path / "run")
    assert "records reused" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == first_base and again.steps == 3


def test_summary_asks_a_real_training_question(spec_file, tmp_path: Path, capsys) -> None:
    from glmtune_app.pipeline import run_pipeline

    run_pipeline(load_spec_file(spec_file()), tmp_path / "run", port=8123)
    first_question = json.loads(QUICKSTART_DATA.read_text(encoding="utf-8").splitlines()[0])["paragraph"][0]["q"]
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8123/v1/chat/completions" in out
    assert json.dumps(first_question, ensure_ascii=False) in out and '"model": "small"' in out


def test_s3_data_in_and_s3_export_out(s3_bucket: str, spec_file, tmp_path: Path) -> None:
    import boto3
    from glmtune_app.pipeline import run_pipeline

    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="data/quickstart.jsonl", Body=QUICKSTART_DATA.read_bytes())
    out_uri = f"s3://{s3_bucket}/models/small"
    spec = load_spec_file(spec_file(output=out_uri, sources=[f"s3://{s3_bucket}/data/"]))
    result = run_pipeline(spec, tmp_path / "run")
    keys = {obj["Key"] for obj in client.list_objects_v2(Bucket=s3_bucket, Prefix="models/small/")["Contents"]}
    assert {"models/small/glmtune-export.json", "models/small/glmtune-manifest.json",
            "models/small/config.json"} <= keys
    assert result.export_uri == out_uri and not (tmp_path / "run" / "export").exists()


def test_a_checkpoint_given_as_model_uri_is_fine_tuned_with_lora(tmp_path: Path) -> None:
    from glmtune_app.pipeline import run_pipeline

    from glmtune.modeling import create_model_dir

    checkpoint = create_model_dir("v1", "tiny", tmp_path / "chatglm-6b", seed=1)
    mapping = small_spec(steps=2)
    mapping["spec"]["model"] = {"uri": str(checkpoint)}
    mapping["spec"]["method"] = {"name": "lora", "lora": {"r": 4}}
    mapping["spec"]["output"]["export"] = "adapter"
    result = run_pipeline(spec_from_mapping(mapping), tmp_path / "run")
    info = read_export_info(result.export_uri, require_complete=True)
    assert (info.kind, info.family, info.base_model) == ("adapter", "v1", str(checkpoint))
    assert not (tmp_path / "run" / "base-model").exists()


@pytest.mark.parametrize("field", ["output", "source", "tokenizer"])
def test_pvc_locations_are_refused_outside_a_cluster(field: str, tmp_path: Path) -> None:
    from glmtune_app.pipeline import run_pipeline

    mapping = small_spec(output="pvc://models/out" if field == "output" else "export",
                         sources=["pvc://datasets/qa.jsonl"] if field == "source" else None)
    if field == "tokenizer":
        mapping["spec"]["model"]["create"]["tokenizer"] = "pvc://tokenizers/chatglm2"
    with pytest.raises(InvalidInputError) as caught:
        run_pipeline(spec_from_mapping(mapping), tmp_path / "run")
    assert caught.value.where == {"output": "spec.output.uri", "source": "spec.data.sources[0]",
                                  "tokenizer": "spec.model.create.tokenizer"}[field]
    assert "only exists inside a cluster" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_spec_error_exits_2_naming_file_line_and_field(tmp_path: Path, capsys) -> None:
    mapping = small_spec()
    mapping["spec"]["training"]["learningRate"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "learningRate" in text)
    assert main(["run", str(path), "--workdir", str(tmp_path / "run")]) == 2
    assert f"{path}:{line} (spec.training.learningRate)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_set_overrides_the_spec_like_glmtune_train(spec_file, tmp_path: Path, capsys) -> None:
    code = main(["run", str(spec_file(steps=3)), "--set", "training.maxSteps=2", "--set", "output.uri=final",
                 "--workdir", str(tmp_path / "run")])
    assert code == 0
    assert read_export_info(tmp_path / "run" / "final", require_complete=True).run["steps"] == 2
    assert f"chat {tmp_path / 'run' / 'final'}" in capsys.readouterr().out


def test_workdir_defaults_to_the_environment_then_glmtune_runs(spec_file, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLMTUNE_WORKDIR", str(tmp_path / "from-env"))
    assert main(["run", str(spec_file(steps=1))]) == 0
    assert (tmp_path / "from-env" / "export" / "glmtune-manifest.json").is_file()
    monkeypatch.delenv("GLMTUNE_WORKDIR")
    assert main(["run", str(spec_file(steps=1))]) == 0
    assert (tmp_path / "glmtune-runs" / "small" / "export" / "glmtune-manifest.json").is_file()


def test_train_puts_a_relative_output_uri_in_the_workdir_like_run(spec_file, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    spec = spec_file(steps=1, output="export")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", str(spec), "--workdir", "../w"]) == 0
    export = tmp_path / "w" / "export"
    assert read_export_info(export, require_complete=True).run["steps"] == 1
    assert not (tmp_path / "elsewhere" / "export").exists()
    assert f"exported (full): {export}" in capsys.readouterr().err


def test_the_pytorchjob_entry_resolves_locations_like_run(spec_file, tmp_path: Path, monkeypatch) -> None:
    from glmtune_trainer.__main__ import main as trainer_main
    from glmtune_trainer.seam import run_locations

    spec = spec_file(steps=1, output="final")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLMTUNE_WORKDIR", str(tmp_path / "pod-work"))
    assert trainer_main([str(spec)]) == 0
    resolved, workdir = run_locations(load_spec_file(spec), None)
    assert workdir == tmp_path / "glmtune-runs" / "small"  # without --workdir or the variable
    assert resolved.spec.output.uri == str(workdir / "final")
    assert (tmp_path / "pod-work" / "final" / "glmtune-manifest.json").is_file()
    assert not (tmp_path / "final").exists()


def test_a_created_base_model_takes_the_given_tokenizer(shared, spec_file, tmp_path: Path, capsys) -> None:
    from glmtune_app.pipeline import run_pipeline

    tokenizer = shared / "reference" / "vectors" / "tokenizers" / "chatglm2"
    spec = load_spec_file(spec_file(steps=1), [f"model.create.tokenizer={tokenizer}"])
    run_pipeline(spec, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "base-model" / "config.json").read_text())
    assert (config["padded_vocab_size"], config["eos_token_id"], config["pad_token_id"]) == (65024, 2, 0)
    assert f"with the tokenizer of {tokenizer}" in capsys.readouterr().err


def test_serving_port_in_use_fails_before_any_work(spec_file, tmp_path: Path) -> None:
    from glmtune_app.pipeline import run_pipeline

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidInputError) as caught:
            run_pipeline(load_spec_file(spec_file()), tmp_path / "run", serve=True, port=port)
    assert caught.value.where == "--port" and not (tmp_path / "run").exists()


def test_nproc_below_one_is_an_input_error(spec_file, tmp_path: Path, capsys) -> None:
    assert main(["run", str(spec_file()), "--nproc", "0", "--workdir", str(tmp_path / "run")]) == 2
    assert "--nproc" in capsys.readouterr().err


def test_importing_the_run_command_does_not_import_torch() -> None:
    code = "import sys, glmtune_app.pipeline, glmtune_app.cli; glmtune_app.cli.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stdout.strip() == "False"


@pytest.mark.slow
def test_nproc_2_trains_under_torchrun_and_exports(spec_file, tmp_path: Path, capsys) -> None:
    from glmtune_app.pipeline import run_pipeline

    result = run_pipeline(load_spec_file(spec_file(steps=2)), tmp_path / "run", nproc=2)
    assert result.steps == 2
    assert read_export_info(tmp_path / "run" / "export", require_complete=True).run["steps"] == 2
    assert "2 processes (torchrun)" in capsys.readouterr().err
