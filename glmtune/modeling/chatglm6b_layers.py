"""ChatGLM-6B (v1) building blocks: 2D rotary, layer-scaled self-attention, GELU MLP, alpha-residual block,
p-tuning v2 prefix encoder.

Tensors are batch-first ([b, heads, seq, head_dim] inside attention, the transformers `Cache` layout); the
arithmetic follows the original THUDM code (reference vectors in ../shared/reference/vectors/chatglm6b_*).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from glmtune.kernels import decode_linear

# The original GLMBlock takes num_layers=28 as a default argument that the model never overrides, so the
# residual scale is sqrt(2 * 28) for every config, tiny ones included.
RESIDUAL_ALPHA = math.sqrt(2 * 28)
MASKED_SCORE = -10000.0


def original_inv_freq(dim: int) -> torch.Tensor:
    """1/10000^(2i/dim) rounded through float16 as the original RotaryEmbedding stores it (values in fp32)."""
    return (1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).half().float()


class RotaryEmbedding(nn.Module):
    """Holds the original per-layer `inv_freq` buffer (a checkpoint key) and turns positions into cos/sin."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", original_inv_freq(dim))

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [b, L, 1, 2*dim] for position_ids [b, 2, L]: first half from positions, second from blocks.

        An fp16 model computes the angles in fp16 like the original; otherwise they are computed in fp32.
        """
        compute = torch.float16 if dtype == torch.float16 else torch.float32
        freqs = position_ids.to(compute)[..., None] * self.inv_freq.to(compute)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        cos = torch.cat((cos[:, 0], cos[:, 1]), dim=-1)[:, :, None, :].to(dtype)
        sin = torch.cat((sin[:, 0], sin[:, 1]), dim=-1)[:, :, None, :].to(dtype)
        return cos, sin


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) rotary applied separately to each half of the head dim of x [b, L, heads, d]."""
    x1a, x1b, x2a, x2b = x.split(x.shape[-1] // 4, dim=-1)
    return x * cos + torch.cat((-x1b, x1a, -x2b, x2a), dim=-1) * sin


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, coeff: float
) -> torch.Tensor:
    """The original arithmetic: q/(sqrt(d)*c), masked scores = -10000, times c, float32 softmax."""
    q = q / (math.sqrt(q.shape[-1]) * coeff)
    scores = torch.matmul(q, k.transpose(-1, -2))
    if keep is not None:
        scores = scores.masked_fill(~keep, MASKED_SCORE)
    probs = torch.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    empty_rows: torch.Tensor | None,
    coeff: float,
) -> torch.Tensor:
    """scaled_dot_product_attention with the original's semantics for rows that may attend to nothing.

    The original fills every score of such a row (left-pad queries) with -10000, i.e. attends uniformly:
    their output is the mean of v. In fp16, q is pre-divided by the layer coefficient as the original does.
    """
    if q.dtype == torch.float16:
        q, scale = q / (math.sqrt(q.shape[-1]) * coeff), coeff
    else:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if empty_rows is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty_rows, scale=scale)
    return torch.where(empty_rows, v.mean(dim=-2, keepdim=True), out)


class SelfAttention(nn.Module):
    """Fused QKV whose rows are interleaved per head ([q_h0 k_h0 v_h0 q_h1 ...]); coefficient layer_idx + 1."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        prefix_key: torch.Tensor | None,
        prefix_value: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        keep: torch.Tensor | None,
        empty_rows: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        b, s, _ = hidden.shape
        qkv = decode_linear(self.query_key_value, hidden).view(b, s, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        cos, sin = rotary
        q = apply_rotary_2d(q, cos, sin).transpose(1, 2)
        k = apply_rotary_2d(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if prefix_key is not None:
            k = torch.cat((prefix_key.to(k.dtype), k), dim=2)
            v = torch.cat((prefix_value.to(v.dtype), v), dim=2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        coeff = float(self.layer_idx + 1)
        if self.config.attn_impl == "math":
            context = math_attention(q, k, v, keep, coeff)
        else:
            context = sdpa_attention(q, k, v, keep, empty_rows, coeff)
        return decode_linear(self.dense, context.transpose(1, 2).reshape(b, s, -1))


class GLU(nn.Module):
    """dense_h_to_4h -> tanh-approximate GELU -> dense_4h_to_h (the original class name and layout)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(decode_linear(self.dense_h_to_4h, hidden), approximate="tanh")
        return decode_linear(self.dense_4h_to_h, hidden)


class GLMBlock(GradientCheckpointingLayer):
    """x_ln = LN(x); h = x_ln*alpha + Attn(x_ln); h_ln = LN(h); out = h_ln*alpha + MLP(h_ln).

    The prefix key/value tensors are positional so reentrant checkpointing still sends gradients to a
    trainable prefix encoder; the cache is a keyword the checkpoint wrapper drops in training.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(
        self,
        hidden: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor],
        keep: torch.Tensor | None,
        empty_rows: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        attention_input = self.input_layernorm(hidden)
        attention_output = self.attention(
            attention_input, prefix_key, prefix_value, rotary, keep, empty_rows, past_key_values
        )
        hidden = attention_input * RESIDUAL_ALPHA + attention_output
        mlp_input = self.post_attention_layernorm(hidden)
        return mlp_input * RESIDUAL_ALPHA + self.mlp(mlp_input)


class PrefixEncoder(nn.Module):
    """p-tuning v2 prompt: Embedding(pre_seq_len, layers*2*hidden), or Embedding -> Linear -> Tanh -> Linear."""

    def __init__(self, config) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.hidden_size
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, width)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)
            self.trans = None

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        out = self.embedding(prefix)
        return self.trans(out) if self.trans is not None else out
