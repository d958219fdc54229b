"""Tokenizers for the ChatGLM family, loaded from a directory laid out as the published models.

Families and their files:
  * ``v1`` ChatGLM-6B: ``ice_text.model`` + ``tokenizer_config.json`` -> `ChatGLMTokenizer`;
  * ``v2`` ChatGLM2-6B and ``v3`` ChatGLM3-6B: ``tokenizer.model`` + ``tokenizer_config.json`` ->
    `ChatGLM2Tokenizer` (v3 adds the role tokens ``<|system|> <|user|> <|assistant|> <|observation|>``);
  * ``glm4`` GLM-4: ``tokenizer.model`` (tiktoken-style ranks, remote-code layout) or, in an ``-hf``
    directory, only ``tokenizer.json`` -> `GLM4Tokenizer` (the same ids either way).

A directory's family is decided by `glmtune.modeling.families.family`, the rule every side uses.

This package is importable without transformers; the tokenizer classes load on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError
from glmtune.modeling.families import FAMILIES, family, tokenizer_file
from glmtune.modeling.families import TOKENIZER_CONFIG as CONFIG_FILE
from glmtune.modeling.families import V1_TOKENIZER_FILE as V1_MODEL_FILE
from glmtune.modeling.families import V2_TOKENIZER_FILE as V2_MODEL_FILE
from glmtune.storage import atomic_write_bytes, atomic_write_json, fetch, is_s3_uri, read_json_object

__all__ = [
    "FAMILIES",
    "ChatGLM2Tokenizer",
    "ChatGLMTokenizer",
    "GLM4Tokenizer",
    "load_tokenizer",
    "save_tokenizer_files",
]

_LAZY = {"ChatGLMTokenizer": "glmtune.tokenization.chatglm6b", "ChatGLM2Tokenizer": "glmtune.tokenization.chatglm2",
         "GLM4Tokenizer": "glmtune.tokenization.glm4"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmtune.tokenization' has no attribute {name!r}")


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def load_tokenizer(path_or_uri: str | os.PathLike) -> Any:
    """`ChatGLMTokenizer` (v1), `ChatGLM2Tokenizer` (v2/v3) or a GLM-4 tokenizer (glm4) from a local directory or
    an ``s3://`` prefix (downloaded once into the glmtune cache by `glmtune.storage.fetch`)."""
    directory = fetch(path_or_uri) if is_s3_uri(path_or_uri) else Path(path_or_uri).expanduser()
    if not directory.is_dir():
        raise InvalidInputError("no tokenizer directory here", where=str(path_or_uri))
    found = family(directory)
    if found == "glm4":
        from glmtune.tokenization.glm4 import load_glm4_tokenizer

        return load_glm4_tokenizer(directory)
    if not (directory / tokenizer_file(found)).is_file():
        raise InvalidInputError(f"a {found} tokenizer needs {tokenizer_file(found)}, which is missing",
                                where=str(directory))
    config = _read_json(directory / CONFIG_FILE)
    if found == "v1":
        from glmtune.tokenization.chatglm6b import CONFIG_KEYS, ChatGLMTokenizer

        kwargs = {key: config[key] for key in CONFIG_KEYS if key in config}
        if config and "num_image_tokens" not in config and "family" not in config:
            # configs from before the 2023-04 vocabulary slimming relied on the original default of 20000
            kwargs["num_image_tokens"] = 20000
        return ChatGLMTokenizer(vocab_file=str(directory / V1_MODEL_FILE), name_or_path=str(path_or_uri),
                                **kwargs)
    from glmtune.tokenization.chatglm2 import ChatGLM2Tokenizer

    padding = {"padding_side": config["padding_side"]} if "padding_side" in config else {}
    return ChatGLM2Tokenizer(vocab_file=str(directory / V2_MODEL_FILE), family=found,
                             name_or_path=str(path_or_uri), **padding)


def save_tokenizer_files(directory: str | os.PathLike, model_file: str, model_bytes: bytes,
                         config: dict) -> tuple[str, ...]:
    """Write the SentencePiece model, then ``tokenizer_config.json`` (last, so a reader never sees half a save)."""
    directory = Path(directory)
    if directory.is_file():
        raise InvalidInputError("is a file; a tokenizer is saved into a directory", where=str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / model_file, model_bytes)
    atomic_write_json(directory / CONFIG_FILE, config)
    return str(directory / CONFIG_FILE), str(directory / model_file)
