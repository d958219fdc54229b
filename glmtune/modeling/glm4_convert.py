"""GLM-4 remote-code layout <-> ``-hf`` layout (transformers' `GlmForCausalLM`): state dicts and config.json.

Tensor for tensor (no arithmetic, so a round trip is bit-identical):
  transformer.embedding.word_embeddings          <-> model.embed_tokens
  transformer.encoder.layers.i.input_layernorm   <-> model.layers.i.input_layernorm
  ...self_attention.query_key_value (rows [q|k|v]) <-> model.layers.i.self_attn.{q,k,v}_proj (weight, bias)
  ...self_attention.dense                        <-> ...self_attn.o_proj
  ...post_attention_layernorm                    <-> ...post_attention_layernorm
  ...mlp.dense_h_to_4h (rows [gate|up])          <-> ...mlp.gate_up_proj (same rows, same order)
  ...mlp.dense_4h_to_h                           <-> ...mlp.down_proj
  transformer.encoder.final_layernorm            <-> model.norm
  transformer.output_layer                       <-> lm_head
``transformer.rotary_pos_emb.inv_freq`` (a buffer the original recomputes) is dropped on the way to ``-hf`` and
rebuilt on the way back. Config: rope base 10000 * rope_ratio <-> rope_theta, RoPE on half of each head <->
partial_rotary_factor 0.5, add_qkv_bias <-> attention_bias. Layouts the other side cannot hold (linear biases
outside qkv, LayerNorm, p-tuning prefixes, int weights) are refused with the field that prevents it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from glmtune.errors import InvalidInputError

ROPE_BASE = 10000.0
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SAME = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_LAYER_SAME = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_INV_FREQ = "transformer.rotary_pos_emb.inv_freq"
# remote-code keys that have no -hf counterpart and must hold these values
_REQUIRED = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
             "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False}
_REFUSED_IF_SET = ("pre_seq_len", "quantization_bit")


def _get(config: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def _shape(config: Mapping[str, Any] | Any) -> tuple[int, int, int]:
    """(heads, key/value groups, head dim) of a remote-code config."""
    heads, head_dim = int(_get(config, "num_attention_heads")), int(_get(config, "kv_channels"))
    groups = int(_get(config, "multi_query_group_num")) if _get(config, "multi_query_attention") else heads
    return heads, groups, head_dim


def check_convertible(config: Mapping[str, Any] | Any, where: str = "config.json") -> None:
    """Refuse a remote-code config whose model `GlmForCausalLM` cannot express, naming the field."""
    for key, value in _REQUIRED.items():
        if bool(_get(config, key, value)) != value:
            raise InvalidInputError(f"must be {str(value).lower()} for the -hf layout (GlmForCausalLM has no "
                                    "such variant)", where=f"{where}:{key}")
    for key in _REFUSED_IF_SET:
        if _get(config, key):
            raise InvalidInputError("must be unset to convert (merge or drop it first: the -hf layout has no "
                                    "place for it)", where=f"{where}:{key}")


def remote_to_hf_state_dict(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | Any
                            ) -> dict[str, torch.Tensor]:
    """`GlmForCausalLM` weights from THUDM remote-code weights (`config`: the remote config.json or object)."""
    check_convertible(config)
    heads, groups, head_dim = _shape(config)
    sizes = [heads * head_dim, groups * head_dim, groups * head_dim]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == _INV_FREQ:
            continue
        if key in _SAME:
            out[_SAME[key]] = tensor
            continue
        match = _LAYER.match(key)
        if match is None:
            raise InvalidInputError("no -hf counterpart for this tensor", where=key)
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest in _LAYER_SAME:
            out[prefix + _LAYER_SAME[rest]] = tensor
        elif rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            if not _get(config, "multi_query_attention"):
                # without MQA the original lays the fused rows out per head: [q_h k_h v_h] for each head h
                tensor = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:]).transpose(0, 1)
                tensor = tensor.reshape(3 * heads * head_dim, *tensor.shape[3:])
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes, dim=0), strict=True):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()
        else:
            raise InvalidInputError("no -hf counterpart for this tensor", where=key)
    return out


def hf_to_remote_state_dict(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | Any,
                            inv_freq: bool = True) -> dict[str, torch.Tensor]:
    """THUDM remote-code weights from `GlmForCausalLM` weights (`config`: the REMOTE config); `inv_freq` adds
    the rotary buffer the published checkpoints carry."""
    check_convertible(config)
    heads, _, head_dim = _shape(config)
    back_same = {v: k for k, v in _SAME.items()}
    back_layer = {v: k for k, v in _LAYER_SAME.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in back_same:
            out[back_same[key]] = tensor
            continue
        match = _HF_LAYER.match(key)
        if match is None:
            raise InvalidInputError("no remote-code counterpart for this tensor", where=key)
        layer, rest = match.groups()
        prefix = f"transformer.encoder.layers.{layer}."
        if rest in back_layer:
            out[prefix + back_layer[rest]] = tensor
        elif re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", rest):
            proj, kind = rest.split(".")[1:]
            qkv.setdefault((prefix, kind), {})[proj] = tensor
        else:
            raise InvalidInputError("no remote-code counterpart for this tensor", where=key)
    for (prefix, kind), parts in qkv.items():
        missing = {"q_proj", "k_proj", "v_proj"} - set(parts)
        if missing:
            raise InvalidInputError(f"missing {', '.join(sorted(missing))} for this layer", where=prefix + kind)
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        if not _get(config, "multi_query_attention"):
            fused = fused.reshape(3, heads, head_dim, *fused.shape[1:]).transpose(0, 1)
            fused = fused.reshape(3 * heads * head_dim, *fused.shape[3:])
        out[f"{prefix}self_attention.query_key_value.{kind}"] = fused
    if inv_freq:
        dim = head_dim // 2
        dtype = out["transformer.embedding.word_embeddings.weight"].dtype
        out[_INV_FREQ] = (1.0 / ROPE_BASE ** (torch.arange(0, dim, 2).float() / dim)).to(dtype)
    return out


def remote_to_hf_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``-hf`` config.json (model_type "glm") of a remote-code config.json mapping. Carries both the
    transformers 5 ``rope_parameters`` and the 4.x top-level rope keys other readers look for."""
    check_convertible(config)
    heads, groups, head_dim = _shape(config)
    rope_theta = ROPE_BASE * float(config.get("rope_ratio", 1.0))
    eos = config.get("eos_token_id")
    out = {
        "architectures": ["GlmForCausalLM"], "model_type": "glm",
        "vocab_size": config["padded_vocab_size"], "hidden_size": config["hidden_size"],
        "intermediate_size": config["ffn_hidden_size"], "num_hidden_layers": config["num_layers"],
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": head_dim, "hidden_act": "silu",
        "attention_dropout": config.get("attention_dropout", 0.0), "max_position_embeddings": config["seq_length"],
        "initializer_range": config.get("initializer_range", 0.02), "rms_norm_eps": config["layernorm_epsilon"],
        "use_cache": config.get("use_cache", True), "tie_word_embeddings": False,
        "rope_theta": rope_theta, "partial_rotary_factor": 0.5,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
        "pad_token_id": config.get("pad_token_id"), "eos_token_id": eos, "bos_token_id": None,
        "attention_bias": bool(config.get("add_qkv_bias", False)),
    }
    if "torch_dtype" in config:
        out["torch_dtype"] = config["torch_dtype"]
    return out


def _rope(config: Mapping[str, Any], where: str) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from either the 5.x rope_parameters or the 4.x top-level keys."""
    rope = dict(config.get("rope_parameters") or {})
    if rope.get("rope_type", "default") != "default":
        raise InvalidInputError("only the default RoPE has a remote-code counterpart",
                                where=f"{where}:rope_parameters.rope_type")
    theta = float(rope.get("rope_theta", config.get("rope_theta", ROPE_BASE)))
    partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)))
    return theta, partial


def hf_to_remote_config(config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The remote-code config.json keys (as glm-4-9b-chat has them) of a ``-hf`` GlmForCausalLM config.json."""
    if config.get("model_type") != "glm":
        raise InvalidInputError(f"expected model_type 'glm' (GlmForCausalLM), got {config.get('model_type')!r}; "
                                "GLM-4-0414 ('glm4') has no remote-code layout", where=f"{where}:model_type")
    theta, partial = _rope(config, where)
    if partial != 0.5:
        raise InvalidInputError("must be 0.5: the remote code rotates half of each head",
                                where=f"{where}:partial_rotary_factor")
    if config.get("hidden_act", "silu") != "silu":
        raise InvalidInputError("must be 'silu' (the remote code's SwiGLU)", where=f"{where}:hidden_act")
    if config.get("tie_word_embeddings"):
        raise InvalidInputError("must be false (the remote code has a separate output layer)",
                                where=f"{where}:tie_word_embeddings")
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    groups = int(config.get("num_key_value_heads") or heads)
    ratio = theta / ROPE_BASE
    out = {
        "model_type": "chatglm", "num_layers": config["num_hidden_layers"], "padded_vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"], "ffn_hidden_size": config["intermediate_size"],
        "kv_channels": head_dim, "num_attention_heads": heads, "seq_length": config.get("max_position_embeddings"),
        "hidden_dropout": 0.0, "classifier_dropout": None, "attention_dropout": config.get("attention_dropout", 0.0),
        "layernorm_epsilon": config.get("rms_norm_eps", 1e-6), "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "add_bias_linear": False,
        "add_qkv_bias": bool(config.get("attention_bias", False)), "bias_dropout_fusion": True,
        "multi_query_attention": groups != heads, "multi_query_group_num": groups if groups != heads else 1,
        "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
        "original_rope": True, "rope_ratio": int(ratio) if ratio.is_integer() else ratio,
        "eos_token_id": config.get("eos_token_id"), "pad_token_id": config.get("pad_token_id"),
        "use_cache": config.get("use_cache", True), "tie_word_embeddings": False,
    }
    if "torch_dtype" in config or "dtype" in config:
        out["torch_dtype"] = config.get("torch_dtype", config.get("dtype"))
    return out
