"""ChatGLM2-6B / ChatGLM3-6B ("v2"): multi-query attention, RMSNorm, SwiGLU, half-dim interleaved RoPE.

Parameter names and shapes are those of THUDM's checkpoints; numerics follow the original remote code
(reference vectors in ../shared/reference/vectors/chatglm2_A), with batch-first tensors and a transformers
`Cache` instead of the original [seq, batch, ...] tuples.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from glmtune.errors import check_fields
from glmtune.modeling.causal_lm import GLMCausalLM, check_model_inputs
from glmtune.modeling.chatglm2_layers import (
    Embedding,
    GLMTransformer,
    PrefixEncoder,
    padding_attention_mask,
    rotary_tables,
)
from glmtune.modeling.hf_compat import CACHE_NAMES, cache_field
from glmtune.modeling.quantization import quantize_model
from glmtune.modeling.windows import find_windows


class ChatGLM2Config(PretrainedConfig):
    """The original ChatGLM2/3 `config.json` keys; `attn_impl` ("sdpa" | "math") is glmtune's own switch."""

    model_type = "chatglm2"
    # vocab_size is the original's copy of padded_vocab_size; aliasing keeps them equal through resizes.
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: float = 0.0
    classifier_dropout: float | None = None
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    bias_dropout_fusion: bool = True
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    original_rope: bool = True
    rope_ratio: float = 1.0
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attn_impl: str = "sdpa"

    def __post_init__(self, **kwargs):
        kwargs.pop("vocab_size", None)  # padded_vocab_size sizes the embedding and the output layer
        super().__post_init__(**kwargs)
        # Derived names that peft's prefix tuning reads to size its per-layer key/value prefix.
        self.num_key_value_heads = self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads
        self.head_dim = self.kv_channels
        checks = [
            ("attn_impl", self.attn_impl in ("sdpa", "math"), "must be 'sdpa' or 'math'"),
            ("quantization_bit", self.quantization_bit in (0, 4, 8), "must be 0, 4 or 8"),
            ("kv_channels", self.kv_channels % 4 == 0, "must be a multiple of 4 (RoPE rotates pairs of half a head)"),
            ("multi_query_group_num", self.num_attention_heads % self.num_key_value_heads == 0,
             "must divide num_attention_heads"),
            ("pre_seq_len", self.pre_seq_len is None or self.pre_seq_len > 0, "must be null or positive"),
        ]
        check_fields(self, checks, prefix="config.")


class ChatGLM2PreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing (config class, checkpointing, no-split unit) for the v2 classes."""

    config_class = ChatGLM2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = list(CACHE_NAMES)
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]


class ChatGLM2Model(ChatGLM2PreTrainedModel):
    """Embedding + encoder + untied output layer (the output layer lives here, as in the original)."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            # As the original: p-tuning v2 trains the prefix only, so everything built so far is frozen.
            for param in self.parameters():
                param.requires_grad = False
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def prefix_cache(self, batch: int, dtype: torch.dtype, cache: DynamicCache | None) -> DynamicCache:
        """Fill `cache` (or a new one) with the p-tuning v2 prefix: layer i gets slots 2i (key), 2i+1 (value)."""
        config = self.config
        tokens = torch.arange(self.pre_seq_len, device=self.prefix_encoder.embedding.weight.device)
        kv = self.prefix_encoder(tokens.unsqueeze(0).expand(batch, -1)).to(dtype)
        kv = kv.view(batch, self.pre_seq_len, config.num_layers * 2, config.multi_query_group_num, config.kv_channels)
        kv = self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)  # [layers*2, b, groups, pre_seq_len, kv_channels]
        cache = cache if cache is not None else DynamicCache()
        for i in range(config.num_layers):
            cache.update(kv[2 * i], kv[2 * i + 1], i)
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = check_model_inputs(input_ids, inputs_embeds, past_key_values, cache)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if self.encoder.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        cache = past_key_values
        if self.pre_seq_len is not None and (cache is None or cache.get_seq_length() == 0):
            cache = self.prefix_cache(batch, inputs_embeds.dtype, cache)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        native_prefix = self.pre_seq_len or 0

        mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if mask_2d is not None:
                positions = mask_2d.long().cumsum(-1) - 1
                position_ids = positions.masked_fill(mask_2d == 0, 0)[:, -q_len:]
            else:
                start = past_len - native_prefix
                position_ids = torch.arange(start, start + q_len, device=device).unsqueeze(0).expand(batch, -1)

        masked = None
        if attention_mask is not None and attention_mask.dim() == 4:
            masked = attention_mask.bool()
            if masked.shape[-1] < past_len + q_len:  # prefix / past columns the caller did not cover are visible
                pad = masked.new_zeros(*masked.shape[:-1], past_len + q_len - masked.shape[-1])
                masked = torch.cat((pad, masked), dim=-1)
        elif (mask_2d is not None and not bool(mask_2d.all())) or (past_len and q_len != 1):
            padding = mask_2d
            if padding is not None and padding.shape[-1] < past_len + q_len:
                padding = torch.cat((padding.new_ones(batch, past_len + q_len - padding.shape[-1]), padding), dim=-1)
            masked = padding_attention_mask(padding, q_len, past_len, batch, device)

        if self.config.attn_impl == "sdpa" and not (self.training and self.config.attention_dropout):
            masked = find_windows(masked) or masked  # packed rows: attention per sample (glmtune.modeling.windows)
        cos, sin = rotary_tables(position_ids.to(device), self.config, inputs_embeds.dtype)
        hidden, all_hidden = self.encoder(
            inputs_embeds, cos, sin, masked, cache, use_cache, output_hidden_states
        )
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, hidden_states=all_hidden, **cache_field(cache if use_cache else None)
        )


# Suffixes of the Linear layers that weight-only quantization replaces (the output layer stays in float).
QUANTIZED_MODULES = (
    "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
)


class ChatGLM2ForConditionalGeneration(GLMCausalLM, ChatGLM2PreTrainedModel, GenerationMixin):
    """The causal LM (`transformer.output_layer` gives the logits); loads THUDM's ChatGLM2/3 weights unchanged."""

    _tied_weights_keys: dict[str, str] = {}
    quantized_modules = QUANTIZED_MODULES

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__(config)
        self.transformer = ChatGLM2Model(config)
        if config.quantization_bit:  # a pre-quantized checkpoint: empty int layers that its weights load into
            quantize_model(self.transformer, config.quantization_bit, QUANTIZED_MODULES, empty_init=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.transformer.output_layer = value
