"""The v2 (ChatGLM2) tokenizer reproduces the original on the real tokenizer.model; v3 adds role tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from testkit import reference_mismatches, require_shared

from glmtune.errors import InvalidInputError
from glmtune.modeling.families import family as detect_family
from glmtune.tokenization import load_tokenizer

ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


@pytest.fixture(scope="module")
def real_dir() -> Path:
    return require_shared("reference", "vectors", "tokenizers", "chatglm2")


@pytest.fixture(scope="module")
def reference(real_dir: Path) -> dict:
    return json.loads((real_dir / "tokenizer_cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(real_dir: Path):
    return load_tokenizer(real_dir)


def _v3_dir(real_dir: Path, target: Path, config: dict) -> Path:
    target.mkdir()
    shutil.copy(real_dir / "tokenizer.model", target / "tokenizer.model")
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def tok3(real_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(_v3_dir(real_dir, tmp_path_factory.mktemp("v3") / "tok", {"family": "v3"}))












def test_build_inputs_with_special_tokens_prepends_gmask_sop(reference: dict, tok) -> None:
    case = reference["build_inputs_with_special_tokens"]
    assert tok.encode(case["token_ids_0_text"], add_special_tokens=False) == case["token_ids_0"]
    assert tok.encode(case["token_ids_1_text"], add_special_tokens=False) == case["token_ids_1"]
    assert tok.build_inputs_with_special_tokens(case["token_ids_0"]) == case["single"]
    assert tok.build_inputs_with_special_tokens(case["token_ids_0"], case["token_ids_1"]) == case["pair"]


def test_batch_pads_on_the_left_with_the_original_mask(reference: dict, tok) -> None:
    case = reference["batch_padding_example"]
    out = tok(case["texts"], padding=True)
    assert out["input_ids"] == case["input_ids"]
    assert out["attention_mask"] == case["attention_mask"]
    tensors = tok.pad({"input_ids": [[5, 6, 7], [8]]}, return_tensors="pt")
    assert tensors["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert tensors["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_special_ids_follow_the_sentencepiece_pieces(reference: dict, tok) -> None:
    assert reference["sentencepiece_pieces"] == 64789
    assert tok.vocab_size == len(tok) == reference["vocab_size(tokenizer)"] == 64794
    for name, token_id in reference["special_ids"].items():
        assert tok.get_command(name) == token_id
    assert (tok.gmask_token_id, tok.sop_token_id, tok.mask_token_id) == (64790, 64792, 64789)
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 0)
    assert tok.get_command("<sop>") == tok.get_command("sop") and tok.get_command("</s>") == 2
    assert tok.all_special_tokens == reference["hf_attributes"]["all_special_tokens"] == []
    with pytest.raises(KeyError):
        tok.get_command("<|user|>")


def test_v3_role_tokens_are_single_ids_after_eop(tok3) -> None:
    assert tok3.family == "v3" and tok3.vocab_size == 64798
    assert [tok3.get_command(r) for r in ROLES] == [64794, 64795, 64796, 64797]
    ids = tok3.encode("<|user|>\n 你好<|assistant|>", add_special_tokens=False)
    assert ids[0] == 64795 and ids[-1] == 64796 and ids.count(64795) == 1
    assert tok3.decode(ids) == "<|user|>\n 你好<|assistant|>"
    assert "<|user|>" not in tok3.decode(ids, skip_special_tokens=True)


def test_v3_encodes_ordinary_text_exactly_like_v2(reference: dict, tok3) -> None:
    assert reference_mismatches(reference, "ids", lambda c: tok3.encode(c["text"])) == []


def test_save_pretrained_keeps_the_layout_and_the_family(tmp_path: Path, real_dir: Path, tok, tok3) -> None:
    tok.save_pretrained(tmp_path / "v2")
    tok3.save_pretrained(tmp_path / "v3")
    for name in ("v2", "v3"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
        assert (tmp_path / name / "tokenizer.model").read_bytes() == (real_dir / "tokenizer.model").read_bytes()
    original = json.loads((real_dir / "tokenizer_config.json").read_text())
    config = json.loads((tmp_path / "v2" / "tokenizer_config.json").read_text())
    assert {k: config[k] for k in original if k != "name_or_path"} == {
        k: v for k, v in original.items() if k != "name_or_path"}
    assert load_tokenizer(tmp_path / "v2").family == "v2"
    again = load_tokenizer(tmp_path / "v3")
    assert again.family == "v3" and again.encode("<|user|>hi") == tok3.encode("<|user|>hi")


@pytest.mark.parametrize("config", [
    {"name_or_path": "THUDM/chatglm3-6b"},
    {"chat_template": "{% for m in messages %}<|{{ m['role'] }}|>\n {{ m['content'] }}{% endfor %}<|user|>"},
])
def test_published_chatglm3_configs_are_detected_as_v3(real_dir: Path, tmp_path: Path, config: dict) -> None:
    directory = _v3_dir(real_dir, tmp_path / "chatglm3", config)
    assert detect_family(directory) == "v3"
    assert load_tokenizer(directory).get_command("<|observation|>") == 64797


def test_chatglm3_model_config_marks_the_directory_v3(real_dir: Path, tmp_path: Path) -> None:
    directory = _v3_dir(real_dir, tmp_path / "chatglm3", {"tokenizer_class": "ChatGLMTokenizer"})
    (directory / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm3-6b", "seq_length": 8192}))
    assert detect_family(directory) == "v3"


def test_a_wrong_family_key_is_invalid_input(real_dir: Path, tmp_path: Path) -> None:
    directory = _v3_dir(real_dir, tmp_path / "bad", {"family": "v4"})
    with pytest.raises(InvalidInputError, match="family must be one of"):
        load_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"family": "v1"}))
    with pytest.raises(InvalidInputError, match="needs ice_text.model"):
        load_tokenizer(directory)


def test_load_from_s3_prefix(tmp_path: Path, s3_bucket: str, tok3) -> None:
    from glmtune.storage import upload_dir

    tok3.save_pretrained(tmp_path / "local")
    upload_dir(tmp_path / "local", f"s3://{s3_bucket}/chatglm3")
    loaded = load_tokenizer(f"s3://{s3_bucket}/chatglm3")
    assert loaded.family == "v3" and loaded.encode("你好<|user|>") == tok3.encode("你好<|user|>")
