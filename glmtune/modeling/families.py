"""Which ChatGLM family a checkpoint, tokenizer directory or config is: the one rule every side uses.

Families: ``v1`` ChatGLM-6B, ``v2`` ChatGLM2-6B, ``v3`` ChatGLM3-6B (ChatGLM2's architecture with role
tokens and its own template), ``glm4`` GLM-4-9B (ChatGLM2's architecture in THUDM's remote-code layout, or
transformers' GlmForCausalLM / Glm4ForCausalLM in the ``-hf`` layouts; its own tokenizer and template). How
`family` decides, first rule that applies:
  1. a ``"family"`` key in ``tokenizer_config.json``, else in ``config.json`` (glmtune writes it on every save);
  1b. GLM-4's published files (`glmtune.modeling.glm4.says_glm4` / `is_glm4_dir`: a native GLM model type, the
     GLM-4 tokenizer class, the 151552-row vocabulary, or a tiktoken-style ``tokenizer.model``);
  2. the architecture keys of ``config.json`` (``position_encoding_2d``/``inner_hidden_size`` -> v1,
     ``padded_vocab_size``/``multi_query_attention`` -> ChatGLM2's architecture);
  3. the tokenizer file: ``ice_text.model`` -> v1, ``tokenizer.model`` -> ChatGLM2's architecture;
ChatGLM2's architecture is v3 when the published ChatGLM3 files say so (``name_or_path`` / ``_name_or_path``
mentions ``chatglm3``, or ``chat_template`` uses ``<|user|>``), else v2. Torch-free: the operator and
`glmtune --help` import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

from glmtune.errors import InvalidInputError
from glmtune.spec.model import Family
from glmtune.storage import read_json_object

FAMILIES: tuple[str, ...] = get_args(Family)
V1_TOKENIZER_FILE = "ice_text.model"
V2_TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
_V1_KEYS = {"position_encoding_2d", "inner_hidden_size", "max_sequence_length"}
_V2_KEYS = {"padded_vocab_size", "multi_query_attention", "kv_channels", "ffn_hidden_size"}


def family(source: str | os.PathLike[str] | Mapping[str, Any] | Any, where: str | None = None) -> str:
    """"v1", "v2", "v3" or "glm4" of a model/tokenizer directory, a config.json mapping or a config object."""
    if isinstance(source, (str, os.PathLike)):
        return _family_of_dir(Path(source))
    return _family_of_config(source, where)


def architecture(name: str) -> str:
    """The architecture a family runs on in glmtune: "v1", or "v2" for ChatGLM2, ChatGLM3 and GLM-4 alike (GLM-4's
    remote-code layout is ChatGLM2's architecture; its ``-hf`` layout is converted into it at load)."""
    if name not in FAMILIES:
        raise InvalidInputError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}", where="family")
    return "v1" if name == "v1" else "v2"


def tokenizer_file(name: str) -> str:
    """The vocabulary file a family's tokenizer directory holds (GLM-4's ``tokenizer.model`` is a tiktoken-style
    ranks text, not SentencePiece; its ``-hf`` directories may hold only ``tokenizer.json``)."""
    return V1_TOKENIZER_FILE if architecture(name) == "v1" else V2_TOKENIZER_FILE


def _family_of_config(config: Mapping[str, Any] | Any, where: str | None) -> str:
    data = dict(config) if isinstance(config, Mapping) else dict(vars(config))
    declared = _declared(data, where)
    if declared is not None:
        return declared
    from glmtune.modeling.glm4 import says_glm4

    if says_glm4(data):
        return "glm4"
    keys = set(data)
    if keys & _V1_KEYS:
        return "v1"
    if keys & _V2_KEYS:
        return "v3" if _says_chatglm3(data) else "v2"
    raise InvalidInputError(
        f"unknown architecture (model_type {data.get('model_type')!r}): expected a ChatGLM-6B config "
        "(position_encoding_2d, inner_hidden_size) or a ChatGLM2/3 config (padded_vocab_size, multi_query_attention)",
        where=where)


def _family_of_dir(directory: Path) -> str:
    tok_config = _read(directory / TOKENIZER_CONFIG)
    model_config = _read(directory / "config.json")
    for source, config in ((TOKENIZER_CONFIG, tok_config), ("config.json", model_config)):
        declared = _declared(config, str(directory / source))
        if declared is not None:
            return declared
    from glmtune.modeling.glm4 import is_glm4_dir

    if is_glm4_dir(directory):
        return "glm4"
    if model_config and set(model_config) & (_V1_KEYS | _V2_KEYS):
        arch = _family_of_config(model_config, str(directory / "config.json"))
        return "v3" if arch == "v2" and _says_chatglm3(tok_config) else arch
    if (directory / V1_TOKENIZER_FILE).is_file():
        return "v1"
    if (directory / V2_TOKENIZER_FILE).is_file():
        return "v3" if _says_chatglm3(tok_config) or _says_chatglm3(model_config) else "v2"
    raise InvalidInputError(
        f"not a ChatGLM model or tokenizer directory: no ChatGLM config.json, and neither {V1_TOKENIZER_FILE} nor "
        f"{V2_TOKENIZER_FILE} is there", where=str(directory))


def _declared(config: Mapping[str, Any], where: str | None) -> str | None:
    value = config.get("family")
    if value is None:
        return None
    if value not in FAMILIES:
        raise InvalidInputError(f"family must be one of {', '.join(FAMILIES)}, got {value!r}",
                                where=f"{where}:family" if where else "family")
    return str(value)


def _says_chatglm3(config: Mapping[str, Any]) -> bool:
    names = [str(config.get(key, "")) for key in ("name_or_path", "_name_or_path")]
    return any("chatglm3" in name.lower() for name in names) or "<|user|>" in str(config.get("chat_template", ""))


def _read(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}
