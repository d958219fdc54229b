"""Tokenizers for the ChatGLM family, loaded from a directory laid out as the published models.

Families and their files:
  * ``v1`` ChatGLM-6B: ``ice_text.model`` + ``tokenizer_config.json`` -> `ChatGLMTokenizer`;
  * ``v2`` ChatGLM2-6B and ``v3`` ChatGLM3-6B: ``tokenizer.model`` + ``tokenizer_config.json`` ->
    `ChatGLM2Tokenizer` (v3 adds the role tokens ``<|system|> <|user|> <|assistant|> <|observation|>``).

How a directory's family is decided (first rule that applies):
  1. a ``"family"`` key (``"v1"``, ``"v2"`` or ``"v3"``) in ``tokenizer_config.json``, else in
     ``config.json``; glmtune writes it whenever it saves a tokenizer (``save_pretrained``, the tiny factory);
  2. ``ice_text.model`` present -> v1;
  3. ``tokenizer.model`` present -> v3 when the published ChatGLM3 files say so: ``name_or_path`` /
     ``_name_or_path`` in ``tokenizer_config.json`` or ``config.json`` mentions ``chatglm3``, or the
     ``chat_template`` of ``tokenizer_config.json`` uses ``<|user|>``; otherwise v2.

This package is importable without transformers; the tokenizer classes load on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError
from glmtune.storage import atomic_write_bytes, atomic_write_json, fetch, is_s3_uri, read_json_object

FAMILIES = ("v1", "v2", "v3")
V1_MODEL_FILE = "ice_text.model"
V2_MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"

__all__ = [
    "FAMILIES",
    "ChatGLM2Tokenizer",
    "ChatGLMTokenizer",
    "detect_family",
    "load_tokenizer",
    "save_tokenizer_files",
]

_LAZY = {"ChatGLMTokenizer": "glmtune.tokenization.chatglm6b", "ChatGLM2Tokenizer": "glmtune.tokenization.chatglm2"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmtune.tokenization' has no attribute {name!r}")


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def _mentions_chatglm3(*configs: dict) -> bool:
    names = [str(c.get(key, "")) for c in configs for key in ("name_or_path", "_name_or_path")]
    return any("chatglm3" in name.lower() for name in names)


def detect_family(directory: str | os.PathLike) -> str:
    """The family ("v1" | "v2" | "v3") of a tokenizer directory, by the rules in the module docstring."""
    directory = Path(directory)
    tok_config = _read_json(directory / CONFIG_FILE)
    model_config = _read_json(directory / "config.json")
    has_v1, has_v2 = (directory / V1_MODEL_FILE).is_file(), (directory / V2_MODEL_FILE).is_file()
    for source, config in ((CONFIG_FILE, tok_config), ("config.json", model_config)):
        family = config.get("family")
        if family is None:
            continue
        if family not in FAMILIES:
            raise InvalidInputError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}",
                                    where=f"{directory / source}:family")
        needed = V1_MODEL_FILE if family == "v1" else V2_MODEL_FILE
        if not (directory / needed).is_file():
            raise InvalidInputError(f"family {family} needs {needed}, which is missing", where=str(directory))
        return family
    if has_v1:
        return "v1"
    if has_v2:
        template = str(tok_config.get("chat_template", ""))
        return "v3" if _mentions_chatglm3(tok_config, model_config) or "<|user|>" in template else "v2"
    raise InvalidInputError(f"not a ChatGLM tokenizer directory: neither {V1_MODEL_FILE} nor {V2_MODEL_FILE} "
                            "is there", where=str(directory))


def load_tokenizer(path_or_uri: str | os.PathLike) -> Any:
    """`ChatGLMTokenizer` (v1) or `ChatGLM2Tokenizer` (v2/v3) from a local directory or an ``s3://`` prefix
    (downloaded once into the glmtune cache by `glmtune.storage.fetch`)."""
    directory = fetch(path_or_uri) if is_s3_uri(path_or_uri) else Path(path_or_uri).expanduser()
    if not directory.is_dir():
        raise InvalidInputError("no tokenizer directory here", where=str(path_or_uri))
    family = detect_family(directory)
    config = _read_json(directory / CONFIG_FILE)
    if family == "v1":
        from glmtune.tokenization.chatglm6b import CONFIG_KEYS, ChatGLMTokenizer

        kwargs = {key: config[key] for key in CONFIG_KEYS if key in config}
        if config and "num_image_tokens" not in config and "family" not in config:
            # configs from before the 2023-04 vocabulary slimming relied on the original default of 20000
            kwargs["num_image_tokens"] = 20000
        return ChatGLMTokenizer(vocab_file=str(directory / V1_MODEL_FILE), name_or_path=str(path_or_uri),
                                **kwargs)
    from glmtune.tokenization.chatglm2 import ChatGLM2Tokenizer

    padding = {"padding_side": config["padding_side"]} if "padding_side" in config else {}
    return ChatGLM2Tokenizer(vocab_file=str(directory / V2_MODEL_FILE), family=family,
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
