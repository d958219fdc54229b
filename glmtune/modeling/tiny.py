"""Tiny and small random ChatGLM models for tests, demos and `glmtune model init`.

A model directory made here has the published layout (config.json with the original keys, safetensors
weights, the family's tokenizer files), so every loader treats it like a downloaded checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, get_args

from glmtune.errors import InvalidInputError
from glmtune.modeling.families import FAMILIES
from glmtune.spec.model import Size

SIZES = get_args(Size)
# name: (layers, hidden, heads); v1 MLP width 4*hidden, v2 SwiGLU width ~ the real 13696/4096 ratio.
_SHAPES = {"tiny": (2, 64, 4), "small": (4, 512, 8)}
# Ids of the published tokenizers, used when no tokenizer is given.
_REAL_V1 = {"vocab_size": 130528, "bos_token_id": 130004, "eos_token_id": 130005, "pad_token_id": 3,
            "mask_token_id": 130000, "gmask_token_id": 130001}
_REAL_V2 = {"padded_vocab_size": 65024, "eos_token_id": 2, "pad_token_id": 0}
_SEQ_LENGTH = {"v2": 32768, "v3": 8192}
# The published checkpoints have more embedding rows than their tokenizer has pieces (len → vocab rows):
# given that very tokenizer, a created model gets the published shape.
_PUBLISHED_ROWS = {"v1": {130344: 130528}, "v2": {64794: 65024}}


def _check(family: str, size: str) -> None:
    if family not in FAMILIES:
        raise InvalidInputError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}", where="family")
    if size not in SIZES:
        raise InvalidInputError(f"size must be one of {', '.join(SIZES)}, got {size!r}", where="size")


def tiny_config(family: str, size: str = "tiny", tokenizer: Any = None) -> Any:
    """A random-init config of `family` ("v1" | "v2" | "v3"): "tiny" = 2 layers, hidden 64; "small" = 4 layers,
    hidden 512, 8 heads. Vocabulary size and special ids come from `tokenizer` (the published row count for a
    published tokenizer), else the published ones."""
    from glmtune.modeling.checkpoint import model_classes

    _check(family, size)
    layers, hidden, heads = _SHAPES[size]
    config_class, _ = model_classes(family)
    rows = None if tokenizer is None else _PUBLISHED_ROWS.get(family, {}).get(len(tokenizer), len(tokenizer))
    if family == "v1":
        ids = dict(_REAL_V1) if tokenizer is None else {
            "vocab_size": rows, "bos_token_id": tokenizer.sop_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "mask_token_id": tokenizer.mask_token_id, "gmask_token_id": tokenizer.gmask_token_id}
        return config_class(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            inner_hidden_size=4 * hidden, max_sequence_length=2048, torch_dtype="float32", **ids)
    ids = dict(_REAL_V2) if tokenizer is None else {
        "padded_vocab_size": rows, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    return config_class(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        kv_channels=hidden // heads, ffn_hidden_size=(hidden * 107 // 32) // 8 * 8,
                        multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
                        seq_length=_SEQ_LENGTH[family], torch_dtype="float32", **ids)


def create_model_dir(family: str, size: str, out_dir: str | os.PathLike[str], seed: int = 0,
                     tokenizer: str | os.PathLike[str] | None = None, layout: str = "remote") -> Path:
    """Write a random-init model of `family`/`size` into `out_dir`, with the tokenizer at `tokenizer` (a
    directory or `s3://` prefix; vocabulary and special ids follow it) or a freshly trained tiny one.

    `load_model(out_dir)` and `load_tokenizer(out_dir)` read it back; v3 is the v2 architecture with the
    ChatGLM3 tokenizer (role tokens) and template. Same family, size, tokenizer and seed give the same weights.
    `layout` is GLM-4's: "remote" (THUDM's remote code) or "hf" (transformers' GlmForCausalLM); other families
    have only the remote layout.
    """
    import torch

    from glmtune.modeling.checkpoint import model_classes, save_pretrained

    _check(family, size)
    if family == "glm4":
        from glmtune.modeling.glm4_checkpoint import create_glm4_model_dir

        loaded = _given_tokenizer(family, tokenizer) if tokenizer is not None else None
        return create_glm4_model_dir(out_dir, layout, size, seed, loaded)
    if layout != "remote":
        raise InvalidInputError(f"only GLM-4 (glm4) has layouts other than 'remote', not {family}", where="layout")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError("already exists and is not an empty directory", where=str(out))
    scratch = Path(tempfile.mkdtemp(prefix="glmtune-tokenizer-"))
    try:
        loaded = _given_tokenizer(family, tokenizer) if tokenizer is not None else _tiny_tokenizer(family, scratch)
        config = tiny_config(family, size, loaded)
        _, model_class = model_classes(family)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(config)
        return save_pretrained(model, out, tokenizer=loaded)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tiny_tokenizer(family: str, scratch: Path) -> Any:
    from glmtune.tokenization import load_tokenizer
    from glmtune.tokenization.tiny import train_tiny_tokenizer

    return load_tokenizer(train_tiny_tokenizer(family, scratch))


def _given_tokenizer(family: str, location: str | os.PathLike[str]) -> Any:
    """The tokenizer at `location`, refused when it belongs to another family than the model's."""
    from glmtune.modeling.families import family as detect_family
    from glmtune.storage import fetch, is_s3_uri
    from glmtune.tokenization import load_tokenizer

    directory = fetch(location) if is_s3_uri(location) else Path(location).expanduser()
    if not directory.is_dir():
        raise InvalidInputError("not a tokenizer directory (ice_text.model or tokenizer.model inside)",
                                where=str(location))
    found = detect_family(directory)
    if found != family:
        raise InvalidInputError(f"this is a {found} tokenizer, but the model to create is {family}: give the "
                                f"tokenizer of a {family} model", where=str(location))
    return load_tokenizer(directory)
