"""The v1 (ChatGLM-6B) tokenizer reproduces the original on the real ice_text.model, case for case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from testkit import require_shared

from glmtune.errors import InvalidInputError
from glmtune.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def real_dir() -> Path:
    return require_shared("reference", "vectors", "tokenizers", "chatglm6b")


@pytest.fixture(scope="module")
def reference(real_dir: Path) -> dict:
    return json.loads((real_dir / "tokenizer_cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(real_dir: Path):
    return load_tokenizer(real_dir)














def test_build_inputs_with_special_tokens_appends_gmask_sop(reference: dict, tok) -> None:
    case = reference["build_inputs_with_special_tokens"]
    assert tok.encode(case["token_ids_0_text"], add_special_tokens=False) == case["token_ids_0"]
    assert tok.encode(case["token_ids_1_text"], add_special_tokens=False) == case["token_ids_1"]
    assert tok.build_inputs_with_special_tokens(case["token_ids_0"]) == case["single"]
    assert tok.build_inputs_with_special_tokens(case["token_ids_0"], case["token_ids_1"]) == case["pair"]


def test_batch_pads_on_the_left_with_a_2d_mask(reference: dict, tok) -> None:
    case = reference["batch_padding_example"]
    out = tok(case["texts"], padding=True)
    assert out["input_ids"] == case["input_ids"]
    lengths = [len(tok.encode(text)) for text in case["texts"]]
    width = max(lengths)
    assert out["attention_mask"] == [[0] * (width - n) + [1] * n for n in lengths]
    tensors = tok(case["texts"], padding=True, return_tensors="pt")
    assert tuple(tensors["input_ids"].shape) == (2, width) and tensors["attention_mask"].dim() == 2


def test_special_token_attributes_match_the_original(reference: dict, tok) -> None:
    expected = reference["hf_attributes"]
    assert tok.bos_token_id == tok.sop_token_id == expected["bos_token_id"] == 130004
    assert tok.eos_token_id == expected["eos_token_id"] == 130005
    assert tok.pad_token_id == expected["pad_token_id"] == 3
    assert tok.mask_token_id == expected["mask_token_id"] == 130000
    assert tok.gmask_token_id == expected["gmask_token_id"] == 130001
    assert sorted(tok.all_special_tokens) == sorted(expected["all_special_tokens"])
    assert tok.vocab_size == len(tok) == reference["vocab_size(tokenizer)"]
    for name, token_id in reference["special_ids"].items():
        assert tok.convert_tokens_to_ids(name) == token_id
    assert [tok.get_command(n) for n in ("[gMASK]", "<sop>", "sop", "<eop>", "[MASK]")] == [
        130001, 130004, 130004, 130005, 130000]
    with pytest.raises(KeyError):
        tok.get_command("<|user|>")


def test_ids_past_the_vocabulary_decode_to_nothing(tok) -> None:
    ids = tok.encode("你好", add_special_tokens=False)
    assert tok.decode(ids + [130400, 130527]) == "你好"


def test_save_pretrained_writes_the_published_layout_and_reloads(tmp_path: Path, real_dir: Path, reference: dict,
                                                                   tok) -> None:
    saved = tok.save_pretrained(tmp_path / "saved")
    assert {Path(p).name for p in saved} == {"ice_text.model", "tokenizer_config.json"}
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["ice_text.model", "tokenizer_config.json"]
    assert (tmp_path / "saved" / "ice_text.model").read_bytes() == (real_dir / "ice_text.model").read_bytes()
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    original = json.loads((real_dir / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in original if k != "name_or_path"} == {
        k: v for k, v in original.items() if k != "name_or_path"}
    again = load_tokenizer(tmp_path / "saved")
    assert [again.encode(c["text"]) for c in reference["cases"]] == [c["ids"] for c in reference["cases"]]


def test_config_from_before_the_vocabulary_slimming_offsets_ids_by_20000(tmp_path: Path, real_dir: Path) -> None:
    (tmp_path / "old").mkdir()
    shutil.copy(real_dir / "ice_text.model", tmp_path / "old" / "ice_text.model")
    original = json.loads((real_dir / "tokenizer_config.json").read_text())
    del original["num_image_tokens"]
    (tmp_path / "old" / "tokenizer_config.json").write_text(json.dumps(original))
    old = load_tokenizer(tmp_path / "old")
    assert (old.gmask_token_id, old.bos_token_id, old.eos_token_id) == (150001, 150004, 150005)
    assert old.decode(old.encode("你好")) == "你好"


def test_missing_directory_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no tokenizer directory"):
        load_tokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="neither ice_text.model nor tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
