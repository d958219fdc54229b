"""What every export records about where it came from (base fingerprint, tokenizer, version, the run's held-out
metrics), and merge-export refusing a base that is not the one the run trained over."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from glmtune_trainer.export import export
from glmtune_trainer.metrics import read_metrics
from glmtune_trainer.run import train_spec

import glmtune
from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import read_export_info
from glmtune.fingerprint import FINGERPRINT_FILE, base_fingerprint


@pytest.fixture
def own_base(tiny_model, tmp_path: Path) -> Path:
    """A private copy of the tiny v2 model, so a test may replace its files."""
    return Path(shutil.copytree(tiny_model("v2"), tmp_path / "base", ignore=shutil.ignore_patterns(FINGERPRINT_FILE)))


def _qa_data(tmp_path: Path, count: int = 12) -> Path:
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"问题{i % 3}", "output": f"答案{i % 3}"}, ensure_ascii=False)
                            + "\n" for i in range(count)), encoding="utf-8")
    return data


def test_an_export_records_the_held_out_metrics_of_its_final_weights(make_spec, tmp_path: Path) -> None:
    # Evaluation each epoch is off and the run stops mid-epoch: the final step is evaluated all the same.
    spec = make_spec("lora", maxSteps=7, batchSize=2, data={"sources": [str(_qa_data(tmp_path))], "evalSplit": 0.25},
                     evaluation={"everyEpoch": False, "generationMetrics": True}, output={"export": "adapter"})
    result = train_spec(spec, tmp_path / "run")
    metrics = read_export_info(result.export.uri).metrics
    assert set(metrics) == {"eval_loss", "perplexity", "bleu4", "rouge_l", "train_loss"}
    logged = read_metrics(tmp_path / "run" / "logs", "eval")
    assert [record["step"] for record in logged] == [7]
    for key in ("eval_loss", "perplexity", "bleu4", "rouge_l"):
        assert metrics[key] == pytest.approx(logged[0][key])
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    train = read_metrics(tmp_path / "run" / "logs", "train")
    steps_per_epoch = round(train[0]["step"] / train[0]["epoch"])
    assert steps_per_epoch < 7  # the run ends inside a later epoch: train_loss is that epoch's mean step loss
    last_epoch = [r["loss"] for r in train if r["step"] > (7 - 1) // steps_per_epoch * steps_per_epoch]
    assert metrics["train_loss"] == pytest.approx(sum(last_epoch) / len(last_epoch))


def test_a_run_without_held_out_data_records_its_train_loss_only(make_spec, tmp_path: Path) -> None:
    result = train_spec(make_spec("lora", maxSteps=2), tmp_path / "run")
    metrics = read_export_info(result.export.uri).metrics
    assert set(metrics) == {"train_loss"}
    losses = [record["loss"] for record in read_metrics(tmp_path / "run" / "logs", "train")]
    assert metrics["train_loss"] == pytest.approx(sum(losses) / len(losses))


def test_an_export_records_its_base_tokenizer_and_version_and_inspect_shows_them(make_spec, tmp_path: Path,
                                                                                capsys) -> None:
    from glmtune_app.cli import main

    from glmtune.tokenization import load_tokenizer

    spec = make_spec("ptv2", family="v2", method_settings={"preSeqLen": 4}, maxSteps=2,
                     data={"sources": [str(_qa_data(tmp_path))], "evalSplit": 0.25})
    result = train_spec(spec, tmp_path / "run")
    info = read_export_info(result.export.uri)
    base = Path(spec.spec.model.uri)
    tokenizer = load_tokenizer(base)
    assert info.base_fingerprint == base_fingerprint(base)
    assert (info.family, info.template, info.pre_seq_len, info.prefix_projection) == ("v2", "v2", 4, False)
    assert (info.eos_token_id, info.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert info.tokenizer_sha256 == {name: storage.file_sha256(Path(result.export.uri) / name)
                                     for name in ("tokenizer.model", "tokenizer_config.json")}
    assert info.glmtune_version == glmtune.__version__

    assert main(["inspect", result.export.uri, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    expected = {"kind": "prefix", "family": "v2", "template": "v2", "base_fingerprint": info.base_fingerprint,
                "pre_seq_len": 4, "prefix_projection": False, "eos_token_id": info.eos_token_id,
                "pad_token_id": info.pad_token_id, "tokenizer_sha256": info.tokenizer_sha256,
                "glmtune_version": glmtune.__version__, "metrics": info.metrics}
    assert {key: shown[key] for key in expected} == expected
    assert {"eval_loss", "perplexity", "train_loss"} <= set(shown["metrics"])
    assert main(["inspect", result.export.uri]) == 0
    text = capsys.readouterr().out
    assert info.base_fingerprint in text and "pre_seq_len 4" in text and glmtune.__version__ in text
    assert f"eos {info.eos_token_id}, pad {info.pad_token_id}" in text
    assert info.tokenizer_sha256["tokenizer.model"] in text
    assert f"eval_loss {info.metrics['eval_loss']:.4g}" in text


def test_merge_export_refuses_a_base_replaced_since_training_unless_allowed(make_spec, own_base: Path,
                                                                           tmp_path: Path) -> None:
    from glmtune.modeling import create_model_dir

    spec = make_spec("lora", maxSteps=1)
    spec.spec.model.uri = str(own_base)
    result = train_spec(spec, tmp_path / "run")
    trained_over = base_fingerprint(own_base)
    # Same shapes, other weights: the folder the checkpoint names now holds another model.
    shutil.rmtree(own_base)
    create_model_dir("v2", "tiny", own_base, seed=1)
    other = base_fingerprint(own_base)
    with pytest.raises(InvalidInputError) as refused:
        export(result.checkpoint_dir, str(tmp_path / "merged"))
    assert trained_over in str(refused.value) and other in str(refused.value)
    assert str(own_base) in str(refused.value) and "run.json" in str(refused.value)
    assert not (tmp_path / "merged").exists()
    forced = export(result.checkpoint_dir, str(tmp_path / "merged"), allow_base_mismatch=True)
    assert read_export_info(forced.uri).base_fingerprint == trained_over
    # The command line: refused with exit 2 naming both, then forced by the flag (glmtune and GGUF formats).
    from glmtune_app.cli import main

    ckpt = str(result.checkpoint_dir)
    assert main(["export", ckpt, str(tmp_path / "cli")]) == 2
    assert main(["export", ckpt, str(tmp_path / "cli"), "--allow-base-mismatch"]) == 0
    assert main(["export", ckpt, str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "f32"]) == 2
    assert main(["export", ckpt, str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "f32",
                 "--allow-base-mismatch"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0


def test_a_checkpoint_from_before_fingerprints_still_exports(make_spec, tmp_path: Path) -> None:
    result = train_spec(make_spec("lora", maxSteps=1), tmp_path / "run")
    run_file = result.checkpoint_dir / "run.json"
    run = json.loads(run_file.read_text())
    assert run.pop("base_fingerprint")
    run_file.write_text(json.dumps(run))
    state_file = result.checkpoint_dir / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("eval_metrics", "epoch_loss_sum", "epoch_loss_steps"):
        state.pop(key)
    state_file.write_text(json.dumps({**state, "eval_loss": 1.5}))
    info = read_export_info(export(result.checkpoint_dir, str(tmp_path / "old")).uri)
    assert info.base_fingerprint == base_fingerprint(run["base_model"])
    assert info.metrics == {"eval_loss": 1.5, "perplexity": pytest.approx(math.exp(1.5))}


def test_export_files_without_the_provenance_fields_still_load_and_bad_values_are_refused(tmp_path: Path) -> None:
    from glmtune.export_format import ExportInfo, write_export_info

    old = {"format": 1, "kind": "adapter", "family": "v2", "template": "v2", "method": "lora",
           "base_model": "/models/base", "pre_seq_len": None, "prefix_projection": False, "quantization_bit": 0,
           "created": "2026-11-01T00:00:00Z", "run": {}}
    (tmp_path / "glmtune-export.json").write_text(json.dumps(old))
    info = read_export_info(tmp_path)
    assert (info.base_fingerprint, info.tokenizer_sha256, info.eos_token_id, info.glmtune_version, info.metrics) == (
        None, {}, None, None, {})
    full = ExportInfo(kind="adapter", family="v2", template="v2", method="lora", base_model="/m",
                      base_fingerprint="a" * 64, tokenizer_sha256={"tokenizer.model": "b" * 64}, eos_token_id=2,
                      pad_token_id=0, glmtune_version="0.1.0", metrics={"eval_loss": 1.25})
    write_export_info(tmp_path, full)
    assert read_export_info(tmp_path) == full
    for key, bad in (("base_fingerprint", "abc"), ("tokenizer_sha256", {"tokenizer.model": "xyz"}),
                     ("eos_token_id", -1), ("pad_token_id", True)):
        (tmp_path / "glmtune-export.json").write_text(json.dumps({**old, key: bad}))
        with pytest.raises(InvalidInputError, match=f"glmtune-export.json:{key}"):
            read_export_info(tmp_path)


def test_a_base_shipped_in_an_s3_export_carries_its_fingerprint_for_readers_without_weights(
        make_spec, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmtune.fingerprint import read_cached_fingerprint

    spec = make_spec("lora", maxSteps=1, output={"export": "adapter", "uri": f"s3://{s3_bucket}/runs/a"})
    result = train_spec(spec, tmp_path / "run")
    assert "base/glmtune-fingerprint.json" in result.export.files
    cached = storage.fetch(f"{result.export.uri}/base/{FINGERPRINT_FILE}", cache_dir=tmp_path / "one")
    info = read_export_info(storage.fetch(result.export.uri, cache_dir=tmp_path / "cache"))
    assert read_cached_fingerprint(cached.read_text()) == info.base_fingerprint == base_fingerprint(
        spec.spec.model.uri)
    monkeypatch.setenv("GLMTUNE_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # the downloaded copy still matches its manifest after a load checked its base
        assert glmtune.load_model(result.export.uri) is not None
    (downloaded,) = [p for p in (tmp_path / "cache" / "s3").iterdir() if (p / "base").is_dir()]
    storage.verify_manifest(downloaded)
