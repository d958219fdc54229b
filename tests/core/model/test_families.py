"""One family rule for model directories, tokenizer directories and configs (glmtune.modeling.families)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmtune.errors import InvalidInputError
from glmtune.modeling.families import architecture, family

V1_CONFIG = {"model_type": "chatglm", "position_encoding_2d": True, "inner_hidden_size": 16384}
V2_CONFIG = {"model_type": "chatglm", "padded_vocab_size": 65024, "multi_query_attention": True}


def _dir(tmp_path: Path, config: dict | None = None, tok_config: dict | None = None, files: tuple = ()) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    if tok_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_configs_by_architecture_keys() -> None:
    assert family(V1_CONFIG) == "v1"
    assert family(V2_CONFIG) == "v2"
    assert family({**V2_CONFIG, "_name_or_path": "THUDM/chatglm3-6b"}) == "v3"
    assert family({**V2_CONFIG, "family": "v3"}) == "v3"


def test_unknown_config_names_where() -> None:
    with pytest.raises(InvalidInputError, match="unknown architecture") as info:
        family({"model_type": "llama"}, where="x/config.json")
    assert "x/config.json" in str(info.value)


def test_published_directories(tmp_path: Path) -> None:
    assert family(_dir(tmp_path / "a", V1_CONFIG, {}, ("ice_text.model",))) == "v1"
    assert family(_dir(tmp_path / "b", V2_CONFIG, {"name_or_path": "THUDM/chatglm2-6b"}, ("tokenizer.model",))) == "v2"
    assert family(_dir(tmp_path / "c", V2_CONFIG, {"name_or_path": "THUDM/chatglm3-6b"}, ("tokenizer.model",))) == "v3"
    assert family(_dir(tmp_path / "d", None, {"chat_template": "<|user|>"}, ("tokenizer.model",))) == "v3"
    assert family(_dir(tmp_path / "e", None, None, ("ice_text.model",))) == "v1"


def test_declared_family_wins_and_is_checked(tmp_path: Path) -> None:
    assert family(_dir(tmp_path / "a", V2_CONFIG, {"family": "v3"}, ("tokenizer.model",))) == "v3"
    with pytest.raises(InvalidInputError, match="family must be one of"):
        family(_dir(tmp_path / "b", V2_CONFIG, {"family": "v9"}, ("tokenizer.model",)))


def test_a_directory_without_anything_chatglm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not a ChatGLM model or tokenizer directory"):
        family(_dir(tmp_path, {"model_type": "llama"}))


def test_architecture_of_each_family() -> None:
    assert [architecture(f) for f in ("v1", "v2", "v3")] == ["v1", "v2", "v2"]
    with pytest.raises(InvalidInputError):
        architecture("v4")
