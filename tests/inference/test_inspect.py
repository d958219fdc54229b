"""`glmtune inspect`: an export describes itself, including how to run it with THUDM's original code."""

from __future__ import annotations

import argparse
import json

import pytest

from glmtune import export_inspect
from glmtune.errors import InvalidInputError


def inspect(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="glmtune")
    export_inspect.register(parser.add_subparsers())
    args = parser.parse_args(["inspect", *argv])
    return args.func(args)


def test_a_prefix_export_states_its_base_precision_and_the_original_code_recipe(exports, capsys):
    assert inspect(str(exports.get("prefix_int4", "v2"))) == 0
    text = capsys.readouterr().out
    assert "prefix export of a v2 model (method ptv2" in text
    assert "pre_seq_len 4" in text and "int4 (the base it was trained over" in text
    assert "THUDM/chatglm2-6b" in text and "modeling_chatglm.py" in text
    assert "pre_seq_len=4" in text and "prefix_encoder.safetensors" in text and "model.quantize(4)" in text


def test_a_v1_export_warns_that_the_original_code_rounds_weights_to_fp16(exports, capsys):
    assert inspect(str(exports.get("full", "v1")), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "full" and data["complete"] and "model.safetensors" in data["files"]
    assert data["original_code"]["repository"] == "THUDM/chatglm-6b"
    assert any("rounded to float16" in note for note in data["original_code"]["notes"])


def test_the_recipe_is_written_into_the_export_file(exports):
    written = json.loads((exports.get("prefix", "v2") / "glmtune-export.json").read_text())
    assert any("pre_seq_len=4" in step for step in written["original_code"]["steps"])


def test_inspecting_a_plain_folder_is_an_input_error(exports):
    with pytest.raises(InvalidInputError, match="not a glmtune export"):
        inspect(str(exports.get("base", "v2")))


def test_an_export_from_before_provenance_says_what_it_does_not_record(exports, capsys):
    assert inspect(str(exports.get("adapter", "v2"))) == 0
    text = capsys.readouterr().out
    assert "token ids not recorded" in text and "version not recorded" in text and "none recorded" in text
    assert "fingerprint" not in text
