"""ChatGLM config.json handling shared by loading and saving: which family, which classes, which dtype.

`original_config` writes config.json with THUDM's keys only, so the original remote code reads our exports;
`inv_freq_buffers` are the rotary buffers their checkpoints carry (recomputed, never read back).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.storage import read_json_object

CONFIG_NAME = "config.json"
OLD_V1_VOCAB = 150528
_V1_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "layernorm_epsilon", "use_cache",
            "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id",
            "max_sequence_length", "inner_hidden_size", "position_encoding_2d", "quantization_bit",
            "pre_seq_len", "prefix_projection")
_V2_KEYS = ("num_layers", "padded_vocab_size", "vocab_size", "hidden_size", "ffn_hidden_size", "kv_channels",
            "num_attention_heads", "seq_length", "hidden_dropout", "classifier_dropout", "attention_dropout",
            "layernorm_epsilon", "rmsnorm", "apply_residual_connection_post_layernorm", "post_layer_norm",
            "add_bias_linear", "add_qkv_bias", "bias_dropout_fusion", "multi_query_attention",
            "multi_query_group_num", "apply_query_key_layer_scaling", "attention_softmax_in_fp32",
            "fp32_residual_connection", "quantization_bit", "pre_seq_len", "prefix_projection", "original_rope",
            "eos_token_id", "pad_token_id", "use_cache", "tie_word_embeddings")
_AUTO_MAP = {
    "v1": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
           "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
           "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "v2": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
           "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
           "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
           "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def family_of_config(config: Mapping[str, Any] | Any, where: str | None = None) -> str:
    """The architecture of a config.json dict or config object: "v1" (ChatGLM-6B) or "v2" (ChatGLM2/3 and GLM-4's
    remote-code layout), by the one family rule in `glmtune.modeling.families`."""
    from glmtune.modeling.families import architecture, family

    return architecture(family(config, where))


def model_classes(family: str) -> tuple[type, type]:
    """(config class, model class) of a family; "v3" shares the v2 architecture."""
    if family == "v1":
        from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration

        return ChatGLMConfig, ChatGLMForConditionalGeneration
    if family in ("v2", "v3"):
        from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

        return ChatGLM2Config, ChatGLM2ForConditionalGeneration
    raise InvalidInputError(f"unknown model family {family!r} (v1, v2 or v3)")


def resolve_dtype(dtype: str | torch.dtype | None, default: Any = None) -> torch.dtype:
    """A torch dtype from a name ("float16", "bf16", ...) or dtype; None falls back to `default`, then float32."""
    for candidate in (dtype, default):
        if candidate is None:
            continue
        if isinstance(candidate, torch.dtype):
            return candidate
        name = str(candidate).removeprefix("torch.")
        if name not in _DTYPES:
            raise InvalidInputError(f"unsupported dtype {candidate!r} (float32, float16 or bfloat16)", where="dtype")
        return _DTYPES[name]
    return torch.float32


def read_config_dict(directory: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory, with clear errors for a missing or broken file."""
    return read_json_object(directory / CONFIG_NAME,
                            "no config.json: not a model directory (expected config.json + weights)",
                            where=str(directory))


def _old_vocab_error(where: str) -> InvalidInputError:
    return InvalidInputError(
        f"this is a pre-2023-04 ChatGLM-6B checkpoint with the {OLD_V1_VOCAB}-token vocabulary (its ids 150004/150005 "
        "are <sop>/<eop>); glmtune reads the slimmed 130528-token release: re-download THUDM/chatglm-6b (weights, "
        "config.json and ice_text.model) and use that", where=where)


def check_v1_vocabulary(config: Mapping[str, Any], where: str) -> None:
    """Refuse the old 150528-vocabulary v1 checkpoints with a message saying what to do instead."""
    if config.get("vocab_size") == OLD_V1_VOCAB or config.get("bos_token_id") == 150004 \
            or config.get("eos_token_id") == 150005:
        raise _old_vocab_error(where)


def inv_freq_buffers(family: str, config: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The rotary buffers THUDM's checkpoints carry (values the original recomputes, kept for identical key sets)."""
    if family == "v1":
        dim = config.hidden_size // (config.num_attention_heads * 2)
        inv = (1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)).half().to(dtype)
        return {f"transformer.layers.{i}.attention.rotary_emb.inv_freq": inv.clone() for i in range(config.num_layers)}
    dim = config.kv_channels // 2
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    return {"transformer.rotary_pos_emb.inv_freq": inv.to(dtype)}


def original_config(model: nn.Module, family: str, dtype: torch.dtype) -> dict[str, Any]:
    """config.json as THUDM's files have it: the original keys only, model_type "chatglm", torch_dtype."""
    import transformers

    config = model.config
    keys = _V1_KEYS if family == "v1" else _V2_KEYS
    data: dict[str, Any] = {
        "architectures": ["ChatGLMForConditionalGeneration"],
        "auto_map": dict(getattr(config, "auto_map", None) or _AUTO_MAP[family]),
        "model_type": "chatglm",
    }
    for key in keys:
        if hasattr(config, key):
            data[key] = getattr(config, key)
    if family != "v1" and float(getattr(config, "rope_ratio", 1.0)) != 1.0:
        data["rope_ratio"] = config.rope_ratio
    data["torch_dtype"] = str(dtype).removeprefix("torch.")
    data["transformers_version"] = transformers.__version__
    return dict(sorted(data.items()))
