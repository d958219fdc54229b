"""GLM-4: glmtune's v2 model runs the remote-code layout exactly as transformers' GlmForCausalLM runs the -hf
layout, and the layout conversion is lossless both ways."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from glmtune.errors import InvalidInputError
from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.modeling.checkpoint_config import inv_freq_buffers, original_config
from glmtune.modeling.glm4 import (
    GLM4_9B_CHAT,
    HF,
    HF_0414,
    REMOTE,
    eos_token_ids,
    glm4_config,
    hf_model_class,
    layout_of_config,
    says_glm4,
    special_token_ids,
    tiny_glm4_config,
)
from glmtune.modeling.glm4_convert import (
    hf_to_remote_config,
    hf_to_remote_state_dict,
    remote_to_hf_config,
    remote_to_hf_state_dict,
)

VOCAB = 1152


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights big enough that logits and greedy tokens differ from position to position (default init is tiny)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
            elif "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            else:  # qkv biases
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def _remote(attn_impl: str = "sdpa", **overrides) -> tuple[ChatGLM2ForConditionalGeneration, dict]:
    config = tiny_glm4_config(vocab_rows=VOCAB)
    for key, value in {"attn_impl": attn_impl, **overrides}.items():
        setattr(config, key, value)
    model = ChatGLM2ForConditionalGeneration(config).eval()
    _randomize(model, 0)
    return model, original_config(model, "v2", torch.float32)


def _hf_from_dict(config: dict) -> GlmForCausalLM:
    hf_config = GlmConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    return GlmForCausalLM(hf_config).eval()


def _published_state(model: ChatGLM2ForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's weights as a THUDM checkpoint holds them (with the rotary inv_freq buffer)."""
    return {**model.state_dict(), **inv_freq_buffers("v2", model.config, torch.float32)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(("ours", "theirs"), [("sdpa", "sdpa"), ("math", "eager")])
def test_remote_layout_gives_glm_for_causal_lm_logits(ours: str, theirs: str) -> None:
    model, remote_config = _remote(ours)
    hf = _hf_from_dict(remote_to_hf_config(remote_config))
    hf.config._attn_implementation = theirs
    hf.load_state_dict(remote_to_hf_state_dict(_published_state(model), remote_config), strict=True)
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, theirs_logits = model(ids).logits, hf(ids).logits
    assert _relative(ours_logits, theirs_logits) <= 1e-5


def test_hf_layout_model_runs_identically_after_conversion_to_remote() -> None:
    remote_config = original_config(ChatGLM2ForConditionalGeneration(tiny_glm4_config(vocab_rows=VOCAB)),
                                    "v2", torch.float32)
    hf = _hf_from_dict(remote_to_hf_config(remote_config))
    _randomize(hf, 2)
    back_config = hf_to_remote_config(json.loads(hf.config.to_json_string()))
    ours = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**back_config)).eval()
    missing, unexpected = ours.load_state_dict(hf_to_remote_state_dict(hf.state_dict(), back_config), strict=False)
    assert missing == [] and unexpected == ["transformer.rotary_pos_emb.inv_freq"]
    ids = torch.randint(0, VOCAB, (3, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _relative(ours(ids).logits, hf(ids).logits) <= 1e-5


def test_left_padded_batch_matches_with_the_same_positions() -> None:
    model, remote_config = _remote()
    hf = _hf_from_dict(remote_to_hf_config(remote_config))
    hf.load_state_dict(remote_to_hf_state_dict(_published_state(model), remote_config))
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits  # derives the positions from the mask itself
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert _relative(ours[mask.bool()], theirs[mask.bool()]) <= 1e-5


def test_conversion_round_trips_give_identical_state_dicts() -> None:
    model, remote_config = _remote()
    published = _published_state(model)
    hf_state = remote_to_hf_state_dict(published, remote_config)
    back = hf_to_remote_state_dict(hf_state, remote_config)
    assert back.keys() == published.keys()
    assert all(torch.equal(back[key], published[key]) for key in published)
    again = remote_to_hf_state_dict(back, remote_config)
    assert again.keys() == hf_state.keys() and all(torch.equal(again[k], hf_state[k]) for k in hf_state)


def test_conversion_round_trip_keeps_the_per_head_qkv_layout_without_mqa() -> None:
    model, remote_config = _remote(multi_query_attention=False)
    model = ChatGLM2ForConditionalGeneration(model.config).eval()
    _randomize(model, 5)
    remote_config = original_config(model, "v2", torch.float32)
    hf = _hf_from_dict(remote_to_hf_config(remote_config))
    hf.load_state_dict(remote_to_hf_state_dict(_published_state(model), remote_config))
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert _relative(model(ids).logits, hf(ids).logits) <= 1e-5
    back = hf_to_remote_state_dict(hf.state_dict(), remote_config)
    assert all(torch.equal(back[k], v) for k, v in _published_state(model).items())


def test_greedy_tokens_identical_in_both_layouts_and_both_directions() -> None:
    model, remote_config = _remote()
    hf = _hf_from_dict(remote_to_hf_config(remote_config))
    hf.load_state_dict(remote_to_hf_state_dict(_published_state(model), remote_config))
    back = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**hf_to_remote_config(remote_to_hf_config(remote_config))))
    back.load_state_dict(hf_to_remote_state_dict(hf.state_dict(), remote_config), strict=False)
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(prompt))
    outputs = [m.eval().generate(prompt, **settings)[0, 10:].tolist() for m in (model, hf, back)]
    assert len(outputs[0]) == 16 and len(set(outputs[0])) > 2  # a real continuation, not one token repeated
    assert outputs[0] == outputs[1] == outputs[2]


def test_config_conversion_round_trips_and_matches_the_published_hf_values() -> None:
    hf = remote_to_hf_config({**GLM4_9B_CHAT, "model_type": "chatglm"})
    # THUDM/glm-4-9b-chat-hf config.json
    assert {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                               "rope_theta", "partial_rotary_factor", "attention_bias", "max_position_embeddings",
                               "eos_token_id", "pad_token_id")} == {
        "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "rms_norm_eps": 1.5625e-07,
        "rope_theta": 5000000.0, "partial_rotary_factor": 0.5, "attention_bias": True,
        "max_position_embeddings": 131072, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329}
    loaded = GlmConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert loaded.rope_parameters["rope_theta"] == 5000000.0
    back = hf_to_remote_config(hf)
    assert {k: back[k] for k in GLM4_9B_CHAT} == GLM4_9B_CHAT


def test_full_size_glm4_9b_maps_onto_glm_for_causal_lm_shape_for_shape() -> None:
    with torch.device("meta"):
        ours = ChatGLM2ForConditionalGeneration(glm4_config())
        remote_config = {**GLM4_9B_CHAT, "model_type": "chatglm"}
        theirs = _hf_from_dict(remote_to_hf_config(remote_config))
    converted = remote_to_hf_state_dict(ours.state_dict(), remote_config)
    expected = theirs.state_dict()
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert 9.3e9 < sum(p.numel() for p in ours.parameters()) < 9.5e9  # "9B": 9.40e9 with the output layer


@pytest.mark.parametrize(("change", "field"), [({"pre_seq_len": 8}, "pre_seq_len"),
                                                ({"add_bias_linear": True}, "add_bias_linear"),
                                                ({"rmsnorm": False}, "rmsnorm")])
def test_unconvertible_remote_configs_are_refused_naming_the_field(change: dict, field: str) -> None:
    _, remote_config = _remote()
    with pytest.raises(InvalidInputError, match=f"config.json:{field}"):
        remote_to_hf_config({**remote_config, **change})


def test_hf_configs_without_a_remote_twin_are_refused() -> None:
    hf = remote_to_hf_config({**GLM4_9B_CHAT, "model_type": "chatglm"})
    with pytest.raises(InvalidInputError, match="model_type"):
        hf_to_remote_config({**hf, "model_type": "glm4"})
    with pytest.raises(InvalidInputError, match="rope_type"):
        hf_to_remote_config({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})


def test_layouts_special_ids_and_detection() -> None:
    assert special_token_ids()["[gMASK]"] == 151331 and special_token_ids()["<sop>"] == 151333
    assert eos_token_ids() == GLM4_9B_CHAT["eos_token_id"]
    assert layout_of_config({"model_type": "chatglm", "padded_vocab_size": 151552}) == REMOTE
    assert layout_of_config({"model_type": "glm"}) == HF and layout_of_config({"model_type": "glm4"}) == HF_0414
    assert hf_model_class(HF) is GlmForCausalLM and hf_model_class(HF_0414).__name__ == "Glm4ForCausalLM"
    assert says_glm4({**GLM4_9B_CHAT, "model_type": "chatglm"})
    assert says_glm4({"padded_vocab_size": 1152}, {"tokenizer_class": "ChatGLM4Tokenizer"})
    chatglm3 = {"padded_vocab_size": 65024, "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm"}
    assert not says_glm4(chatglm3, {"tokenizer_class": "ChatGLMTokenizer"})
    with pytest.raises(InvalidInputError, match="not a GLM-4 config"):
        layout_of_config({"model_type": "llama"})
