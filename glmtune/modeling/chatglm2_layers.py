"""ChatGLM2/3 ("v2") building blocks: RMSNorm, half-dim interleaved RoPE, multi-query self-attention,
SwiGLU MLP, pre-norm block, the layer stack, p-tuning v2 prefix encoder and the word embedding.

Batch-first tensors ([b, heads, seq, head_dim] inside attention, the transformers `Cache` layout); the
arithmetic follows the original THUDM code (reference vectors in ../shared/reference/vectors/chatglm2_A).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from glmtune.kernels import decode_linear
from glmtune.modeling.windows import WindowedMask, windowed_attention

if TYPE_CHECKING:
    from glmtune.modeling.chatglm2 import ChatGLM2Config


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


# Query rows up to which CPU attention over a KV cache stacks the heads of a KV group as query rows of one SDPA
# call: with enable_gqa, torch's CPU flash kernel runs one tiny block per head and query (at ChatGLM2-6B's shapes,
# one query over 512 cached keys 2.0 ms a layer, over 2048 keys 8.0 ms); stacked, the same kernel runs one block
# per group (0.11 ms and 0.38 ms; bench/bench_quant_decode.py --only attention, 2 threads).
DECODE_MAX_QUERIES = 4


def decode_attention_applies(q: torch.Tensor, k: torch.Tensor, masked: torch.Tensor | None, dropout: float) -> bool:
    """Whether `decode_attention` takes this call: CPU, a few query rows, no dropout, and either one query (which
    sees every cached key) or a mask shared by all heads; a causal square block without a mask stays with SDPA."""
    lq = q.shape[2]
    if q.device.type != "cpu" or dropout or lq > DECODE_MAX_QUERIES or q.shape[1] % k.shape[1]:
        return False
    if masked is None:
        return lq == 1
    return masked.dim() == 4 and masked.shape[1] == 1 and masked.shape[2] == lq and masked.shape[3] == k.shape[2]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor | None) -> torch.Tensor:
    """Attention of a few queries [b, heads, q, d] over keys/values [b, groups, L, d] (True in `masked`
    [b, 1, q, L] = hidden) as SDPA over [b, groups, heads/groups * q, d]: the heads sharing a group's keys become
    rows of one query block, so nothing is repeated and the result is SDPA's own arithmetic."""
    b, heads, lq, d = q.shape
    groups, length = k.shape[1], k.shape[2]
    per_group = heads // groups * lq
    allowed = None
    if masked is not None:  # the same mask row for every head of the group
        allowed = ~masked[:, :, None].expand(b, 1, heads // groups, lq, length).reshape(b, 1, per_group, length)
    context = F.scaled_dot_product_attention(q.reshape(b, groups, per_group, d), k, v, attn_mask=allowed)
    return context.view(b, heads, lq, d)


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
        q, k, v = self._split_qkv(decode_linear(self.query_key_value, hidden))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif past_k is not None:
            k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
        dropout = self.config.attention_dropout if self.training else 0.0
        if self.config.attn_impl == "sdpa":
            context = self._sdpa(q, k, v, masked, dropout)
        else:
            context = self._math_attention(q, k, v, masked.masked if isinstance(masked, WindowedMask) else masked,
                                           dropout)
        b, _, L, _ = context.shape
        return decode_linear(self.dense, context.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor | WindowedMask | None,
              dropout: float) -> torch.Tensor:
        """SDPA in the form that fits the call: a packed-window square block, a decode step over the cache (heads
        of a KV group as query rows), or one plain call."""
        if isinstance(masked, WindowedMask):
            if q.shape[2] == k.shape[2] and not dropout:
                return windowed_attention(q, k, v, masked.rows)
            masked = masked.masked
        if decode_attention_applies(q, k, masked, dropout):
            return decode_attention(q, k, v, masked)
        causal = masked is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if masked is None else ~masked, dropout_p=dropout, is_causal=causal,
            enable_gqa=self.num_kv != self.num_heads,
        )

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
        a, b = decode_linear(self.dense_h_to_4h, hidden).chunk(2, dim=-1)
        return decode_linear(self.dense_4h_to_h, F.silu(a) * b)


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
