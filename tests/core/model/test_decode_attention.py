"""The CPU decode attention path of ChatGLM2 (glmtune.modeling.chatglm2_layers.decode_attention): a few query rows
over a KV cache, the heads of a KV group stacked as query rows of one SDPA call, equal to SDPA with enable_gqa and
to a float64 reference within rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.modeling.chatglm2_layers import (
    DECODE_MAX_QUERIES,
    decode_attention,
    decode_attention_applies,
    padding_attention_mask,
)

SDPA_OP = "aten::_scaled_dot_product_flash_attention_for_cpu"


def sdpa_query_shapes(fn) -> list[list[int]]:
    """The query shape of every CPU flash-attention call fn() makes, from torch's profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [list(event.input_shapes[0]) for event in prof.events() if event.name == SDPA_OP]


def qkv(heads: int, groups: int, lq: int, length: int, dtype: torch.dtype, batch: int = 2):
    torch.manual_seed(0)
    q = (torch.randn(batch, heads, lq, 32) * 2).to(dtype)
    k = (torch.randn(batch, groups, length, 32) * 2).to(dtype)
    v = torch.randn(batch, groups, length, 32).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,groups", [(8, 2), (4, 4), (6, 1)])
def test_one_query_equals_sdpa_and_the_float32_reference(dtype, heads, groups):
    q, k, v = qkv(heads, groups, 1, 37, dtype)
    out = decode_attention(q, k, v, None)
    sdpa = F.scaled_dot_product_attention(q, k, v, enable_gqa=groups != heads)
    repeat = heads // groups
    reference = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(repeat, 1),
                                               v.double().repeat_interleave(repeat, 1))
    assert out.dtype == dtype and out.shape == q.shape
    # SDPA's own kernel (float32 accumulation): within one rounding of the dtype of the float64 reference
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), reference, rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), sdpa.float(), rtol=2 * tol, atol=2 * tol)


def test_a_few_queries_with_a_padding_mask_equal_masked_sdpa():
    lq, past = 3, 20
    q, k, v = qkv(8, 2, lq, past + lq, torch.float32)
    real = torch.ones(2, past + lq, dtype=torch.long)
    real[1, :5] = 0  # left padding on the second row
    masked = padding_attention_mask(real, lq, past, 2, q.device)
    assert decode_attention_applies(q, k, masked, 0.0)
    out = decode_attention(q, k, v, masked)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked, enable_gqa=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_which_calls_take_the_decode_path():
    q1, k, _ = qkv(8, 2, 1, 9, torch.float32)
    many, _, _ = qkv(8, 2, DECODE_MAX_QUERIES + 1, 9, torch.float32)
    square, k_square, _ = qkv(8, 2, 3, 3, torch.float32)
    assert decode_attention_applies(q1, k, None, 0.0)
    assert not decode_attention_applies(q1, k, None, 0.1)  # dropout stays with SDPA
    assert not decode_attention_applies(many, k, None, 0.0)  # prompt-sized blocks stay with SDPA
    assert not decode_attention_applies(square, k_square, None, 0.0)  # unmasked causal block: SDPA's is_causal
    per_head = torch.zeros(2, 8, 1, 9, dtype=torch.bool)
    assert not decode_attention_applies(q1, k, per_head, 0.0)


def tiny_v2(attn_impl: str) -> ChatGLM2ForConditionalGeneration:
    torch.manual_seed(0)
    config = ChatGLM2Config(num_layers=2, padded_vocab_size=256, hidden_size=64, ffn_hidden_size=160, kv_channels=16,
                            num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2,
                            add_qkv_bias=True, seq_length=256, eos_token_id=2, pad_token_id=0, attn_impl=attn_impl)
    model = ChatGLM2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.3)
    return model


def test_model_decoding_takes_the_path_and_matches_the_math_reference():
    sdpa, math_model = tiny_v2("sdpa"), tiny_v2("math")
    ids = torch.randint(5, 250, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded batch row: the decode steps then carry a mask
    with torch.no_grad():
        fast = sdpa.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                             output_logits=True, return_dict_in_generate=True)
        slow = math_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                   output_logits=True, return_dict_in_generate=True)
    assert fast.sequences.tolist() == slow.sequences.tolist()
    for a, b in zip(fast.logits, slow.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        out = sdpa(input_ids=ids[:1], use_cache=True)
        shapes = sdpa_query_shapes(lambda: sdpa(input_ids=ids[:1, -1:], past_key_values=out.past_key_values))
    # 4 heads over 2 KV groups: the step's query goes in as [1, 2 groups, 2 heads x 1 query, 16], not [1, 4, 1, 16]
    assert shapes == [[1, 2, 2, 16]] * 2
