"""GLM-4 (THUDM/glm-4-9b-chat and its ``-hf`` / 0414 relatives): config values, layouts, detection.

The remote-code layout (``model_type`` "chatglm", ``ChatGLMForConditionalGeneration``, weights under
``transformer.encoder.layers.*``) is ChatGLM2/3's architecture with GLM-4's values: 40 layers, hidden 4096,
32 heads over 2 key/value groups, qkv bias, ``rope_ratio`` 500 (RoPE base 10000 * 500 on the first half of each
head, in interleaved pairs), RMSNorm eps 1.5625e-7, 151552 embedding rows. `ChatGLM2ForConditionalGeneration`
runs it unchanged (tests/core/model/test_glm4.py checks it against transformers' `GlmForCausalLM` on converted weights).
The ``-hf`` layout (``model_type`` "glm", THUDM/glm-4-9b-chat-hf) is transformers' own `GlmForCausalLM`;
GLM-4-0414 (``model_type`` "glm4") is `Glm4ForCausalLM`, an architecture of its own (extra post-attention and
post-MLP norms) with no remote-code twin. `glmtune.modeling.glm4_convert` maps the first two into each other.

Torch-free at import: detection runs in the operator and the CLI parser.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glmtune.errors import InvalidInputError

FAMILY = "glm4"
# Layouts a GLM-4 checkpoint comes in: THUDM's remote code, or transformers' native classes.
REMOTE, HF, HF_0414 = "remote", "hf", "hf-0414"
LAYOUTS = (REMOTE, HF, HF_0414)
_MODEL_TYPE_LAYOUT = {"glm": HF, "glm4": HF_0414}
HF_MODEL_TYPES = tuple(_MODEL_TYPE_LAYOUT)  # config.json model_type of the native (-hf) layouts
HF_ARCHITECTURES = {HF: "GlmForCausalLM", HF_0414: "Glm4ForCausalLM"}
# Block Linears by name suffix, per layout: what weight-only int8/int4 quantization replaces (glmtune's
# quantize_model works on the native classes too) and where LoRA goes by default (the fused qkv / its parts).
QUANTIZED_MODULES = {
    REMOTE: ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    HF: ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_up_proj",
         "mlp.down_proj"),
}
QUANTIZED_MODULES[HF_0414] = QUANTIZED_MODULES[HF]
LORA_TARGETS = {REMOTE: ("query_key_value",), HF: ("q_proj", "k_proj", "v_proj"), HF_0414: ("q_proj", "k_proj", "v_proj")}

# THUDM/glm-4-9b-chat config.json (architecture keys; "num_hidden_layers" there repeats num_layers).
GLM4_9B_CHAT: dict[str, Any] = {
    "num_layers": 40, "padded_vocab_size": 151552, "hidden_size": 4096, "ffn_hidden_size": 13696,
    "kv_channels": 128, "num_attention_heads": 32, "seq_length": 131072, "hidden_dropout": 0.0,
    "classifier_dropout": None, "attention_dropout": 0.0, "layernorm_epsilon": 1.5625e-07, "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "add_bias_linear": False,
    "add_qkv_bias": True, "bias_dropout_fusion": True, "multi_query_attention": True, "multi_query_group_num": 2,
    "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
    "original_rope": True, "rope_ratio": 500, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
    "tie_word_embeddings": False,
}
# Ranked (non-special) tokens of the published tokenizer.model; the 14 special tokens follow them.
PUBLISHED_RANKS = 151329
# name: (layers, hidden, heads, key/value groups); "small" is the benchmark shape.
_SHAPES = {"tiny": (2, 64, 4, 2), "small": (4, 512, 8, 2)}
_RANKS_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+\r?\n")


def special_token_ids(n_ranks: int = PUBLISHED_RANKS) -> dict[str, int]:
    """Special token -> id for a tokenizer with `n_ranks` ranked tokens (they follow the ranks, in order)."""
    from glmtune.tokenization.glm4 import SPECIAL_TOKENS

    return {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}


def eos_token_ids(n_ranks: int = PUBLISHED_RANKS) -> list[int]:
    """What ends a GLM-4 answer: ``<|endoftext|>``, ``<|user|>`` (next turn), ``<|observation|>`` (a tool call)."""
    ids = special_token_ids(n_ranks)
    return [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]


def glm4_config(**overrides: Any) -> Any:
    """A `ChatGLM2Config` with glm-4-9b-chat's values, `overrides` applied (e.g. a tiny shape)."""
    from glmtune.modeling.chatglm2 import ChatGLM2Config

    values = {**GLM4_9B_CHAT, **overrides}
    values.setdefault("torch_dtype", "float32")
    return ChatGLM2Config(**values)


def tiny_glm4_config(size: str = "tiny", tokenizer: Any = None, vocab_rows: int | None = None) -> Any:
    """A random-init GLM-4 config: "tiny" = 2 layers, hidden 64; "small" = 4 layers, hidden 512. Embedding
    rows: `vocab_rows`, else the tokenizer's length rounded up to a multiple of 128 (as 151343 -> 151552), else
    the published 151552; special ids follow the tokenizer."""
    if size not in _SHAPES:
        raise InvalidInputError(f"size must be one of {', '.join(_SHAPES)}, got {size!r}", where="size")
    from glmtune.tokenization.glm4 import SPECIAL_TOKENS

    layers, hidden, heads, groups = _SHAPES[size]
    if tokenizer is not None:
        n_ranks, needed = len(tokenizer.ranks), len(tokenizer)
        vocab_rows = -(-needed // 128) * 128 if vocab_rows is None else vocab_rows
    else:  # no tokenizer: the special tokens take the last rows, as if the ranks filled the rest
        vocab_rows = GLM4_9B_CHAT["padded_vocab_size"] if vocab_rows is None else vocab_rows
        n_ranks = PUBLISHED_RANKS if vocab_rows == GLM4_9B_CHAT["padded_vocab_size"] else vocab_rows - len(SPECIAL_TOKENS)
        needed = n_ranks + len(SPECIAL_TOKENS)
    if vocab_rows < needed or n_ranks < 1:
        raise InvalidInputError(f"must hold the {needed} tokens (ranks and special tokens)", where="vocab_rows")
    return glm4_config(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, kv_channels=hidden // heads,
                       multi_query_group_num=groups, ffn_hidden_size=(hidden * 107 // 32) // 8 * 8,
                       padded_vocab_size=vocab_rows, eos_token_id=eos_token_ids(n_ranks),
                       pad_token_id=special_token_ids(n_ranks)["<|endoftext|>"])


def layout_of_config(config: Mapping[str, Any], where: str | None = None) -> str:
    """"remote", "hf" or "hf-0414" from a GLM-4 config.json's ``model_type``."""
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPE_LAYOUT:
        return _MODEL_TYPE_LAYOUT[model_type]
    if model_type in ("chatglm", "chatglm2", None) and "padded_vocab_size" in config:
        return REMOTE
    raise InvalidInputError(f"not a GLM-4 config (model_type {model_type!r}): expected 'chatglm' (remote code), "
                            "'glm' (GlmForCausalLM) or 'glm4' (Glm4ForCausalLM)", where=where)


def says_glm4(model_config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None = None) -> bool:
    """Whether published config files say GLM-4: a native GLM model type, the GLM-4 tokenizer class, or the
    151552-row GLM-4 vocabulary (no ChatGLM2/3 has it). Folder names are not trusted (users name folders)."""
    tokenizer_config = tokenizer_config or {}
    if model_config.get("model_type") in _MODEL_TYPE_LAYOUT:
        return True
    if tokenizer_config.get("tokenizer_class") == "ChatGLM4Tokenizer":
        return True
    return model_config.get("padded_vocab_size") == GLM4_9B_CHAT["padded_vocab_size"]


def looks_like_ranks_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a tiktoken-style ``base64 rank`` text (GLM-4's tokenizer.model), not SentencePiece's
    binary protobuf (ChatGLM2/3's file of the same name)."""
    with open(path, "rb") as handle:
        head = handle.read(256)
    return bool(_RANKS_LINE.match(head))


def is_glm4_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether a model or tokenizer directory is GLM-4 by its config files or its tokenizer.model's format."""
    from glmtune.storage import read_json_object

    directory = Path(directory)
    configs = [read_json_object(directory / name) if (directory / name).is_file() else {}
               for name in ("config.json", "tokenizer_config.json")]
    if says_glm4(configs[0], configs[1]):
        return True
    model_file = directory / "tokenizer.model"
    return model_file.is_file() and looks_like_ranks_file(model_file)


def hf_model_class(layout: str) -> type:
    """transformers' native class for an ``-hf`` layout ("hf" -> GlmForCausalLM, "hf-0414" -> Glm4ForCausalLM)."""
    if layout not in HF_ARCHITECTURES:
        raise InvalidInputError(f"layout must be one of {', '.join(HF_ARCHITECTURES)}, got {layout!r}",
                                where="layout")
    import transformers

    return getattr(transformers, HF_ARCHITECTURES[layout])
