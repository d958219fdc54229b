"""generate() on both model families under every transformers API we support (5.23's `past_key_values`,
5.24's `cache`): greedy output must equal a step-by-step greedy loop over the plain forward. Run in .venv
(pinned) and by scripts/test_latest.sh (newest releases)."""

from __future__ import annotations

import pytest
import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model
from sharp_models import GMASK as V1_GMASK
from sharp_models import MASK as V1_MASK
from sharp_models import PAD as V1_PAD
from sharp_models import SOP as V1_SOP
from sharp_models import sharp_v1_model
from torch import nn
from transformers.cache_utils import DynamicCache

from glmtune.errors import InvalidInputError
from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.modeling.chatglm6b import ChatGLMForConditionalGeneration
from glmtune.modeling.chatglm6b_masks import glm_position_ids
from glmtune.modeling.hf_compat import CACHE_NAME, output_cache, take_cache

V2_PAD, V2_EOS = 0, 2
NEW_TOKENS = 6


def v1_model() -> ChatGLMForConditionalGeneration:
    """2 layers, hidden 32, weights scaled up so greedy decoding does not repeat one token."""
    return sharp_v1_model()


def v2_model() -> ChatGLM2ForConditionalGeneration:
    """2 layers, multi-query attention, weights large enough that greedy decoding is not one repeated token."""
    torch.manual_seed(0)
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(
        num_layers=2, padded_vocab_size=128, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
        num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
        seq_length=256, eos_token_id=V2_EOS, pad_token_id=V2_PAD))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.25)
    return model.eval()


def left_padded(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2, the first row left-padded by 3 (v1 prompts end in [gMASK] <sop> as the tokenizer builds them)."""
    if family == "v1":
        rows, pad = [[10, 11, 12, 13, V1_GMASK, V1_SOP], [20, 21, 22, 23, 24, 25, 26, 27, V1_GMASK, V1_SOP]], V1_PAD
    else:
        rows, pad = [[30, 31, 32, 33, 34, 35], [40, 41, 42, 43, 44, 45, 46, 47, 48]], V2_PAD
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


MODELS = {"v1": v1_model, "v2": v2_model}


def manual_greedy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int, eos: int, pad: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by one full forward (no cache) over the whole sequence per step, with generate()'s
    stopping rule (a finished row gets pad tokens); returns (sequences, per-step logits [steps, b, vocab])."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    scores = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].float()
            scores.append(logits)
            token = torch.where(done, pad, logits.argmax(-1))
            done |= token == eos
            ids = torch.cat((ids, token[:, None]), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids, torch.stack(scores)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_greedy_generate_equals_a_manual_greedy_loop(family: str, use_cache: bool) -> None:
    model = MODELS[family]()
    ids, mask = left_padded(family)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                             use_cache=use_cache, output_scores=True, return_dict_in_generate=True)
    expected, expected_scores = manual_greedy(model, ids, mask, NEW_TOKENS, eos, pad)
    assert out.sequences.tolist() == expected.tolist()
    torch.testing.assert_close(torch.stack(out.scores), expected_scores, rtol=1e-5, atol=1e-5)
    answers = expected[:, ids.shape[1]:]
    assert all(len(set(row.tolist())) > 1 for row in answers), f"degenerate model, answers {answers.tolist()}"


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_peft_prefix_tuned_greedy_generate_equals_a_manual_greedy_loop(family: str) -> None:
    """peft hands its prefix over as `past_key_values` while transformers >= 5.24 runs generate() on `cache`."""
    peft_model = get_peft_model(MODELS[family](), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                      num_virtual_tokens=3)).eval()
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.normal_(0.0, 1.0)
    ids, mask = left_padded(family)
    config = peft_model.base_model.config
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                  output_scores=True, return_dict_in_generate=True)
    expected, expected_scores = manual_greedy(peft_model, ids, mask, NEW_TOKENS, config.eos_token_id,
                                              config.pad_token_id)
    assert out.sequences.tolist() == expected.tolist()
    torch.testing.assert_close(torch.stack(out.scores), expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_forward_takes_the_cache_under_either_name(family: str) -> None:
    model = MODELS[family]()
    ids, mask = left_padded(family)
    step = torch.tensor([[50], [51]])
    full_ids = torch.cat((ids, step), dim=1)
    full_mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    # a v1 decode step's positions come from the whole sequence (as prepare_inputs_for_generation builds them)
    positions = None if family == "v2" else glm_position_ids(
        full_ids, full_mask, bos_token_id=V1_SOP, mask_token_id=V1_MASK, gmask_token_id=V1_GMASK)[..., -1:]
    logits = {}
    with torch.no_grad():
        for name in ("past_key_values", "cache"):
            prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = output_cache(prefill)
            assert isinstance(cache, DynamicCache) and cache.get_seq_length() == ids.shape[1]
            assert prefill.get(CACHE_NAME) is cache
            logits[name] = model(input_ids=step, attention_mask=full_mask, position_ids=positions, use_cache=True,
                                 **{name: cache}).logits
            assert cache.get_seq_length() == ids.shape[1] + 1
        full = model(input_ids=full_ids, attention_mask=full_mask, use_cache=False).logits
    torch.testing.assert_close(logits["cache"], logits["past_key_values"], rtol=0, atol=0)
    torch.testing.assert_close(logits["cache"][:, -1], full[:, -1], rtol=0, atol=1e-5)


def test_take_cache_picks_the_running_cache_and_refuses_non_caches() -> None:
    empty, prefix, running = DynamicCache(), DynamicCache(), DynamicCache()
    prefix.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), 0)
    running.update(torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4), 0)
    assert take_cache(prefix, None) is prefix
    assert take_cache(None, running) is running
    assert take_cache(prefix, empty) is prefix  # first step: generate's cache is still empty
    assert take_cache(prefix, running) is running  # later steps: peft re-injects its prefix
    for name, past, cache in (("cache", None, ((1, 2),)), ("past_key_values", [(1, 2)], None)):
        with pytest.raises(InvalidInputError, match=f"^{name}: the KV cache must be a transformers Cache"):
            take_cache(past, cache)
