"""ChatGLM2-6B / ChatGLM3-6B ("v2"): multi-query attention, RMSNorm, SwiGLU, half-dim interleaved RoPE.

Parameter names and shapes are those of THUDM's checkpoints; numerics follow the original remote code
(reference vectors in ../shared/reference/vectors/chatglm2_A), with batch-first tensors and a transformers
`Cache` instead of the original [seq, batch, ...] tuples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from glmtune.errors import InvalidInputError
from glmtune.modeling.quantization import quantize_model


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
        for field, ok, message in checks:
            if not ok:
                raise InvalidInputError(f"{message}, got {getattr(self, field)!r}", where=f"config.{field}")


class RMSNorm(nn.Module):
    """weight * x / rms(x), the variance taken in float32 as the original does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return (self.weight * (hidden * torch.rsqrt(variance + self.eps))).to(hidden.dtype)


def _norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


def rotary_tables(
    position_ids: torch.Tensor, config: ChatGLM2Config, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [b, 1, L, kv_channels/4] for RoPE on the first kv_channels/2 dims (fp16/bf16 tables like the original)."""
    rot_dim = config.kv_channels // 2
    base = 10000.0 * config.rope_ratio
    theta = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=position_ids.device) / rot_dim))
    angles = position_ids.to(torch.float32)[..., None] * theta
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]
    if dtype in (torch.float16, torch.bfloat16):
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x0,x1),(x2,x3),... of the first 2 * cos.shape[-1] dims of x [b, h, L, d]."""
    rot = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def padding_attention_mask(padding_mask: torch.Tensor | None, q_len: int, past_len: int, batch: int,
                           device: torch.device) -> torch.Tensor:
    """The original get_masks: causal AND key-is-not-pad, pad query rows fully open when there is no past.

    Returns bool [b, 1, q, past + q] with True = masked; `padding_mask` is the 2-D 0/1 mask over past + q.
    """
    keep = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    if past_len:
        keep = torch.cat((torch.ones(q_len, past_len, dtype=torch.bool, device=device), keep), dim=-1)
    keep = keep.expand(batch, q_len, past_len + q_len)
    if padding_mask is not None:
        real = padding_mask.bool()
        keep = keep & real[:, None, :]
        if not past_len:
            keep = keep | ~real[:, :, None]
    return ~keep[:, None]


class SelfAttention(nn.Module):
    """Fused QKV split contiguously as [q | k | v]; query head j reads key/value group j // (heads/groups)."""

    def __init__(self, config: ChatGLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.multi_query = config.multi_query_attention
        self.num_kv = config.multi_query_group_num if self.multi_query else self.num_heads
        self.config = config  # attn_impl is read per call, so a benchmark can switch it on a live model
        projection = self.num_heads * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, projection + 2 * self.num_kv * self.head_dim,
            bias=config.add_bias_linear or config.add_qkv_bias,
        )
        self.dense = nn.Linear(projection, config.hidden_size, bias=config.add_bias_linear)

    def _split_qkv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, L = mixed.shape[:2]
        if self.multi_query:
            q, k, v = mixed.split([self.num_heads * self.head_dim, self.num_kv * self.head_dim,
                                   self.num_kv * self.head_dim], dim=-1)
            q = q.view(b, L, self.num_heads, self.head_dim)
            k = k.view(b, L, self.num_kv, self.head_dim)
            v = v.view(b, L, self.num_kv, self.head_dim)
        else:  # the non-MQA original lays the fused rows out per head: [q_h k_h v_h] for each head h
            q, k, v = mixed.view(b, L, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masked: torch.Tensor | None,
                cache: Cache | None, past_k: torch.Tensor | None, past_v: torch.Tensor | None) -> torch.Tensor:
        """Appends the new keys/values to `cache` when given, else reads `past_k`/`past_v` without storing."""
        q, k, v = self._split_qkv(self.query_key_value(hidden))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif past_k is not None:
            k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config.attn_impl == "sdpa":
            causal = masked is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if masked is None else ~masked, dropout_p=dropout, is_causal=causal,
                enable_gqa=self.num_kv != self.num_heads,
            )
        else:
            context = self._math_attention(q, k, v, masked, dropout)
        b, _, L, _ = context.shape
        return self.dense(context.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))

    def _math_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor | None,
                        dropout: float) -> torch.Tensor:
        """Explicit float32 softmax attention, kept as the exactness reference for the SDPA path."""
        repeat = self.num_heads // self.num_kv
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        if masked is None and q.shape[2] == k.shape[2]:
            masked = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        probs = F.dropout(torch.softmax(scores, dim=-1).to(v.dtype), p=dropout, training=dropout > 0)
        return torch.matmul(probs, v)


class MLP(nn.Module):
    """SwiGLU: dense_4h_to_h(silu(a) * b) with [a | b] = dense_h_to_4h(x)."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        a, b = self.dense_h_to_4h(hidden).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    """Pre-norm residual block: x + Attn(norm(x)), then + MLP(norm(.))."""

    def __init__(self, config: ChatGLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.post_ln_residual = config.apply_residual_connection_post_layernorm
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masked: torch.Tensor | None,
                cache: Cache | None, past_k: torch.Tensor | None, past_v: torch.Tensor | None) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        attn = self.self_attention(normed, cos, sin, masked, cache, past_k, past_v)
        residual = normed if self.post_ln_residual else hidden
        hidden = residual + F.dropout(attn, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.post_ln_residual else hidden
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)


class GLMTransformer(nn.Module):
    """The layer stack and the final norm; owns the gradient-checkpointing switch transformers toggles."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = _norm(config) if config.post_layer_norm else None
        self.gradient_checkpointing = False

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masked: torch.Tensor | None,
                cache: Cache | None, use_cache: bool, output_hidden_states: bool
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        checkpointing = self.gradient_checkpointing and self.training
        all_hidden: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        write = cache if use_cache and not checkpointing else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden += (hidden,)
            # Without writing (training with a prefix, checkpoint replays) the past goes in as plain tensors, so
            # a replay never appends twice and reentrant checkpointing still sees the prefix's autograd inputs.
            past_k = past_v = None
            if write is None and cache is not None and i < len(cache.layers) and cache.get_seq_length(i) > 0:
                past_k, past_v = cache.layers[i].keys, cache.layers[i].values
            if checkpointing:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, cos, sin, masked, None, past_k, past_v)
            else:
                hidden = layer(hidden, cos, sin, masked, write, past_k, past_v)
        if all_hidden is not None:  # v2 appends the last layer's output BEFORE the final norm
            all_hidden += (hidden,)
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return hidden, all_hidden


class PrefixEncoder(nn.Module):
    """P-tuning v2: per-layer key/value prefixes from an embedding (optionally through a 2-layer MLP)."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        kv_size = config.num_layers * config.kv_channels * config.multi_query_group_num * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        self.trans = (
            nn.Sequential(nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size))
            if config.prefix_projection else None
        )

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.trans is not None else out


class Embedding(nn.Module):
    """Word embeddings under the original module path `transformer.embedding.word_embeddings`."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.fp32_residual = config.fp32_residual_connection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.word_embeddings(input_ids)
        return embeds.float() if self.fp32_residual else embeds


class ChatGLM2PreTrainedModel(PreTrainedModel):
    """Shared transformers plumbing (config class, checkpointing, no-split unit) for the v2 classes."""

    config_class = ChatGLM2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = ["past_key_values"]
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
        **kwargs,
    ) -> BaseModelOutputWithPast:
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

        cos, sin = rotary_tables(position_ids.to(device), self.config, inputs_embeds.dtype)
        hidden, all_hidden = self.encoder(
            inputs_embeds, cos, sin, masked, cache, use_cache, output_hidden_states
        )
        return BaseModelOutputWithPast(
            last_hidden_state=hidden, past_key_values=cache if use_cache else None, hidden_states=all_hidden
        )


class ChatGLM2ForConditionalGeneration(ChatGLM2PreTrainedModel, GenerationMixin):
    """The causal LM (`transformer.output_layer` gives the logits); loads THUDM's ChatGLM2/3 weights unchanged."""

    _tied_weights_keys: dict[str, str] = {}

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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if kwargs.get("output_attentions"):
            raise InvalidInputError("output_attentions is not available (attention runs through SDPA)",
                                    where="output_attentions")
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.transformer.output_layer(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )
        return result.to_tuple() if return_dict is False else result

    def quantize(self, bits: int) -> ChatGLM2ForConditionalGeneration:
        """Weight-only int8/int4 for the four big Linear layers of every block (the original's choice)."""
        if self.config.quantization_bit:
            raise InvalidInputError(f"model is already quantized to {self.config.quantization_bit} bits",
                                    where="quantization_bit")
        quantize_model(self.transformer, bits, QUANTIZED_MODULES)
        self.config.quantization_bit = bits
        return self


# Suffixes of the Linear layers that weight-only quantization replaces (the output layer stays in float).
QUANTIZED_MODULES = (
    "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None) -> torch.Tensor:
    """float32 cross-entropy of shifted labels (-100 ignored): a mean, or a sum over `num_items` (HF Trainer)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items, device=total.device, dtype=total.dtype)
