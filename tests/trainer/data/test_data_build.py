"""`glmtune data build|stats|show`: real data through every strategy, determinism, interruption, reuse, S3 cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from glmtune_app.cli import main as glmtune_main
from glmtune_trainer.data import build as build_module
from glmtune_trainer.data.build import BuildConfig, build_records, open_records, read_manifest
from glmtune_trainer.data.encode import SampleEncoder

from glmtune import storage

STRATEGIES = ("truncation", "singlesliding", "doublesliding", "packing")


def _config(inputs, tokenizer, out, **kwargs) -> BuildConfig:
    return BuildConfig(
        inputs=[str(p) for p in inputs], tokenizer=str(tokenizer), out=str(out), progress=False, **kwargs
    )


def _all_records(out: Path) -> list[tuple[list[int], list[list[int]]]]:
    records = open_records(out)
    return [(r.input_ids.tolist(), r.segments.tolist()) for r in (records[i] for i in range(len(records)))]


def _forbid_tokenizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized although the build should have been reused")

    monkeypatch.setattr(SampleEncoder, "encode", refuse)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_builds_real_alpaca_with_the_real_tokenizer(
    alpaca_subset, shared, tmp_path, strategy
) -> None:
    tokenizer = shared / "reference" / "vectors" / "tokenizers" / "chatglm6b"
    result = build_records(
        _config([alpaca_subset], tokenizer, tmp_path / "out", strategy=strategy, max_length=128)
    )
    stats = result.manifest["stats"]
    assert result.origin == "built" and stats["samples"] == 160
    lengths = open_records(tmp_path / "out").lengths()
    assert lengths.max() <= 128 and stats["tokens"] == lengths.sum()
    if strategy == "packing":
        assert stats["sequences"] < stats["windows"] and stats["padding_efficiency_pad_to_max"] > 0.9
    else:
        assert stats["sequences"] == stats["windows"] >= 160 and stats["truncated"] > 0


def test_chatglm2_tokenizer_and_chat_and_seed_formats(shared, tmp_path, tiny_tokenizer_dirs) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
            ensure_ascii=False,
        )
    )
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps({"id": 0, "paragraph": [{"q": "a", "a": ["b", "c"]}, {"q": "d", "a": "e"}]}))
    tokenizer = shared / "reference" / "vectors" / "tokenizers" / "chatglm2"
    result = build_records(_config([chat, seed], tokenizer, tmp_path / "v2", shuffle=False))
    assert result.manifest["template"] == "v2" and result.manifest["stats"]["samples"] == 3
    assert [i["samples"] for i in result.manifest["inputs"]] == [1, 2]
    result = build_records(_config([chat, seed], tiny_tokenizer_dirs["v3"], tmp_path / "v3", mixed=False))
    assert sorted(result.manifest["datasets"]) == ["000-chat", "001-seed"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_whole_alpaca_file_builds_with_every_strategy(shared, tmp_path, strategy) -> None:
    tokenizer = shared / "reference" / "vectors" / "tokenizers" / "chatglm6b"
    data = shared / "data" / "alpaca_zh_0-3252.json"
    result = build_records(_config([data], tokenizer, tmp_path / "o", strategy=strategy, skip_invalid=True))
    assert result.manifest["stats"]["samples"] == 3243 and result.manifest["invalid"]["by_reason"] == {
        "empty_field": 4
    }


def test_one_and_two_workers_write_identical_records(alpaca_subset, tiny_tokenizer_dirs, tmp_path) -> None:
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        build_records(
            _config(
                [alpaca_subset],
                tiny_tokenizer_dirs["v1"],
                out,
                strategy="packing",
                max_length=256,
                workers=workers,
                chunk_samples=40,
            )
        )
        outs.append(out)
    one, two = (read_manifest(o) for o in outs)
    assert one["hash"] == two["hash"] and one["datasets"] == two["datasets"]
    for shard in one["datasets"]["train"]["shards"]:
        for suffix in (".tokens", ".segments", ".index"):
            name = f"{shard['name']}{suffix}"
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_shuffle_is_seeded_and_no_shuffle_keeps_source_order(
    alpaca_subset, tiny_tokenizer_dirs, tmp_path
) -> None:
    tok = tiny_tokenizer_dirs["v2"]
    order = {}
    for name, kwargs in {
        "a": {"seed": 1},
        "b": {"seed": 1},
        "c": {"seed": 2},
        "plain": {"shuffle": False},
    }.items():
        build_records(_config([alpaca_subset], tok, tmp_path / name, **kwargs))
        order[name] = [segments[0][4] for _, segments in _all_records(tmp_path / name)]
    assert order["a"] == order["b"] != order["c"] and order["plain"] == list(range(160))
    assert sorted(order["a"]) == order["plain"]


def test_interrupted_build_leaves_no_manifest(
    alpaca_subset, tiny_tokenizer_dirs, tmp_path, monkeypatch
) -> None:
    calls = {"n": 0}
    original = build_module.ShardWriter.add

    def add_then_die(self, windows):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        original(self, windows)

    monkeypatch.setattr(build_module.ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_records(_config([alpaca_subset], tiny_tokenizer_dirs["v1"], tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists() and os.listdir(tmp_path / "out") == []
    assert glmtune_main(["data", "stats", str(tmp_path / "out")]) == 2


@pytest.mark.slow
def test_killed_build_process_leaves_no_manifest(shared, tmp_path) -> None:
    data = shared / "data" / "alpaca_zh_0-3252.json"
    tokenizer = shared / "reference" / "vectors" / "tokenizers" / "chatglm6b"
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glmtune_app.cli",
            "data",
            "build",
            str(data),
            "--tokenizer",
            str(tokenizer),
            "--out",
            str(out),
            "--skip-invalid",
            "--no-progress",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(out.glob(".staging-*/raw/*.tokens")) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (out / "manifest.json").exists()
    small = tmp_path / "small.jsonl"
    small.write_text('{"instruction": "a", "output": "b"}\n')
    assert (
        glmtune_main(
            ["data", "build", str(small), "--tokenizer", str(tokenizer), "--out", str(out), "--no-progress"]
        )
        == 0
    )
    assert (out / "manifest.json").exists() and not list(out.glob(".staging-*"))  # the dead build's leftovers


def test_a_matching_build_is_reused_without_tokenizing(
    alpaca_subset, tiny_tokenizer_dirs, tmp_path, monkeypatch
) -> None:
    config = _config([alpaca_subset], tiny_tokenizer_dirs["v1"], tmp_path / "out")
    first = build_records(config)
    _forbid_tokenizing(monkeypatch)
    again = build_records(BuildConfig(**{**config.__dict__, "workers": 2}))
    assert again.origin == "local" and again.manifest["hash"] == first.manifest["hash"]


def test_s3_inputs_and_s3_cache_hit_downloads_instead_of_tokenizing(
    alpaca_subset, tiny_tokenizer_dirs, tmp_path, s3_bucket, monkeypatch
) -> None:
    client = storage.s3_client()
    client.upload_file(str(alpaca_subset), s3_bucket, "data/part-0.json")
    client.put_object(Bucket=s3_bucket, Key="data/readme.txt", Body=b"not data")
    cache = f"s3://{s3_bucket}/record-cache"
    first = build_records(
        _config([f"s3://{s3_bucket}/data"], tiny_tokenizer_dirs["v1"], tmp_path / "a", cache=cache)
    )
    assert (
        first.origin == "built"
        and first.manifest["inputs"][0]["name"] == f"s3://{s3_bucket}/data/part-0.json"
    )
    keys = [o.key for o in storage.list_objects(f"{cache}/{first.manifest['hash']}")]
    assert f"record-cache/{first.manifest['hash']}/glmtune-manifest.json" in keys
    _forbid_tokenizing(monkeypatch)
    second = build_records(
        _config([f"s3://{s3_bucket}/data"], tiny_tokenizer_dirs["v1"], tmp_path / "b", cache=cache)
    )
    assert second.origin == "cache" and _all_records(tmp_path / "b") == _all_records(tmp_path / "a")


def test_cli_build_stats_json_and_show(alpaca_subset, tiny_tokenizer_dirs, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = glmtune_main(
        [
            "data",
            "build",
            str(alpaca_subset),
            "--tokenizer",
            str(tiny_tokenizer_dirs["v1"]),
            "--out",
            str(out),
            "--strategy",
            "packing",
            "--max-length",
            "512",
            "--no-progress",
        ]
    )
    assert code == 0
    capsys.readouterr()
    assert glmtune_main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 160 and stats["sequences"] < 160 and stats["padding_efficiency"] > 0.9
    assert {"tokens", "truncated", "length_histogram", "hash"} <= set(stats)
    assert glmtune_main(["data", "stats", str(out)]) == 0
    assert "padding eff." in capsys.readouterr().out
    assert glmtune_main(["data", "show", str(out), "0"]) == 0
    shown = capsys.readouterr().out
    assert "trained" in shown and "labels : " in shown
    first = open_records(out)[0]
    assert shown.count("-- window") == len(first.segments)
    assert glmtune_main(["data", "show", str(out), "99999"]) == 2


def test_cli_bad_input_exits_2_naming_file_and_line(tiny_tokenizer_dirs, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n')
    args = [
        "data",
        "build",
        str(bad),
        "--tokenizer",
        str(tiny_tokenizer_dirs["v1"]),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert glmtune_main(args) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert glmtune_main([*args, "--skip-invalid", "--max-invalid-fraction", "0.6"]) == 0
    assert "empty_field: 1" in capsys.readouterr().err
    capsys.readouterr()
    # The build above is reused (same hash), but its skipped records still answer to this run's policy.
    assert glmtune_main([*args, "--skip-invalid"]) == 2  # 1 of 2 bad is over the default 5%
    assert "1 of 2 records are invalid" in capsys.readouterr().err
    assert glmtune_main(args) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
