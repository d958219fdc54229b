"""Tiny and small random ChatGLM models for tests, demos and `glmtune model init`.

A model directory made here has the published layout (config.json with the original keys, safetensors
weights, the family's tokenizer files), so every loader treats it like a downloaded checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError

FAMILIES = ("v1", "v2", "v3")
SIZES = ("tiny", "small")
# name: (layers, hidden, heads); v1 MLP width 4*hidden, v2 SwiGLU width ~ the real 13696/4096 ratio.
_SHAPES = {"tiny": (2, 64, 4), "small": (4, 512, 8)}
# Ids of the published tokenizers, used when no tokenizer is given.
_REAL_V1 = {"vocab_size": 130528, "bos_token_id": 130004, "eos_token_id": 130005, "pad_token_id": 3,
            "mask_token_id": 130000, "gmask_token_id": 130001}
_REAL_V2 = {"padded_vocab_size": 65024, "eos_token_id": 2, "pad_token_id": 0}
_SEQ_LENGTH = {"v2": 32768, "v3": 8192}


def _check(family: str, size: str) -> None:
    if family not in FAMILIES:
        raise InvalidInputError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}", where="family")
    if size not in SIZES:
        raise InvalidInputError(f"size must be one of {', '.join(SIZES)}, got {size!r}", where="size")


def tiny_config(family: str, size: str = "tiny", tokenizer: Any = None) -> Any:
    """A random-init config of `family` ("v1" | "v2" | "v3"): "tiny" = 2 layers, hidden 64; "small" = 4 layers,
    hidden 512, 8 heads. Vocabulary size and special ids come from `tokenizer`, else the published ones."""
    from glmtune.modeling.checkpoint import model_classes

    _check(family, size)
    layers, hidden, heads = _SHAPES[size]
    config_class, _ = model_classes(family)
    if family == "v1":
        ids = dict(_REAL_V1) if tokenizer is None else {
            "vocab_size": len(tokenizer), "bos_token_id": tokenizer.sop_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "mask_token_id": tokenizer.mask_token_id, "gmask_token_id": tokenizer.gmask_token_id}
        return config_class(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            inner_hidden_size=4 * hidden, max_sequence_length=2048, torch_dtype="float32", **ids)
    ids = dict(_REAL_V2) if tokenizer is None else {
        "padded_vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    return config_class(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        kv_channels=hidden // heads, ffn_hidden_size=(hidden * 107 // 32) // 8 * 8,
                        multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
                        seq_length=_SEQ_LENGTH[family], torch_dtype="float32", **ids)


def create_model_dir(family: str, size: str, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a random-init model of `family`/`size` with a freshly trained tiny tokenizer into `out_dir`.

    `load_model(out_dir)` and `load_tokenizer(out_dir)` read it back; v3 is the v2 architecture with the
    ChatGLM3 tokenizer (role tokens) and template. Same family, size and seed give the same weights.
    """
    import torch

    from glmtune.modeling.checkpoint import model_classes, save_pretrained
    from glmtune.tokenization import load_tokenizer
    from glmtune.tokenization.tiny import train_tiny_tokenizer

    _check(family, size)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError("already exists and is not an empty directory", where=str(out))
    scratch = Path(tempfile.mkdtemp(prefix="glmtune-tokenizer-"))
    try:
        tokenizer = load_tokenizer(train_tiny_tokenizer(family, scratch))
        config = tiny_config(family, size, tokenizer)
        _, model_class = model_classes(family)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(config)
        return save_pretrained(model, out, tokenizer=tokenizer)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
