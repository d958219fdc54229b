"""ChatGLM-6B (v1): outputs of the original THUDM code on the reference vectors, and the model contract
(cache, padding, packing, gradient checkpointing, peft LoRA / prefix tuning, errors)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from sharp_models import EOP, GMASK, MASK, PAD, SOP, sharp_v1_model
from testkit import require_shared

from glmtune.errors import InvalidInputError
from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.modeling.chatglm6b_layers import RotaryEmbedding
from glmtune.modeling.chatglm6b_masks import glm_attention_mask, glm_position_ids
from glmtune.modeling.hf_compat import enable_activation_checkpointing

IMPLS = ["sdpa", "math"]


# ---------------------------------------------------------------- reference vectors


def load_case(case: str, **overrides) -> tuple[ChatGLMForConditionalGeneration, dict]:
    """The original weights loaded straight into our model (lm_head tied, so absent), plus the vectors."""
    folder = require_shared("reference", "vectors", case)
    config = ChatGLMConfig(**{**json.loads((folder / "config.json").read_text()), **overrides})
    model = ChatGLMForConditionalGeneration(config).eval()
    state = load_file(folder / "model.safetensors")
    if not config.pre_seq_len:
        state = {k: v for k, v in state.items() if "prefix_encoder" not in k}
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    return model, load_file(folder / "vectors.safetensors")


@pytest.fixture(scope="module")
def case_a():
    return load_case("chatglm6b_A")


@pytest.fixture(scope="module")
def case_b():
    return load_case("chatglm6b_B")


def assert_ref(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The suggested tolerance of the reference README: rtol 1e-4, atol 1e-4 * max|expected|."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(), msg=what)


def assert_compact_logits(logits: torch.Tensor, vectors: dict, prefix: str) -> None:
    """Compare against the compact set stored for 130528-token logits (robust to near-ties in the top 8)."""
    assert_ref(torch.logsumexp(logits, dim=-1), vectors[f"{prefix}_logsumexp"], f"{prefix} logsumexp")
    top8 = vectors[f"{prefix}_top8_values"]
    assert_ref(logits.gather(-1, vectors[f"{prefix}_top8_indices"]), top8, f"{prefix} top-8 logits")
    assert_ref(logits[..., vectors["logit_cols"]], vectors[f"{prefix}_logits_cols"], f"{prefix} logit columns")
    clear = (top8[..., 0] - top8[..., 1]) > 1e-3 * top8.abs().max()
    assert torch.equal(logits.argmax(-1)[clear], vectors[f"{prefix}_argmax"][clear])


def left_pad_mask(input_ids: torch.Tensor) -> torch.Tensor:
    return (input_ids != PAD).long()


def test_masks_and_positions_from_a_2d_mask_equal_the_original_tokenizers(case_a):
    model, v = case_a
    ids, cfg = v["gen_input_ids"], model.config
    mask = glm_attention_mask(ids, left_pad_mask(ids), bos_token_id=cfg.bos_token_id)
    positions = glm_position_ids(ids, left_pad_mask(ids), bos_token_id=cfg.bos_token_id,
                                 mask_token_id=cfg.mask_token_id, gmask_token_id=cfg.gmask_token_id)
    assert torch.equal(mask, v["gen_attention_mask"])
    assert torch.equal(positions, v["gen_position_ids"])


@pytest.mark.parametrize("case,batch", [("chatglm6b_A", "gen_modeldefault"), ("chatglm6b_A", "train"),
                                        ("chatglm6b_B", "gen"), ("chatglm6b_B", "train")])
def test_masks_and_positions_without_a_mask_equal_the_original_models(case, batch):
    folder = require_shared("reference", "vectors", case)
    cfg = ChatGLMConfig(**json.loads((folder / "config.json").read_text()))
    v = load_file(folder / "vectors.safetensors")
    ids = v["train_input_ids" if batch == "train" else "gen_input_ids"]
    assert torch.equal(glm_attention_mask(ids, bos_token_id=cfg.bos_token_id), v[f"{batch}_attention_mask"])
    positions = glm_position_ids(ids, bos_token_id=cfg.bos_token_id, mask_token_id=cfg.mask_token_id,
                                 gmask_token_id=cfg.gmask_token_id)
    assert torch.equal(positions, v[f"{batch}_position_ids"])


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_forward_matches_reference_logits_and_hidden_states(case_a, impl):
    model, v = case_a
    model.config.attn_impl = impl
    with torch.no_grad():
        out = model(v["gen_input_ids"], attention_mask=left_pad_mask(v["gen_input_ids"]), output_hidden_states=True)
    assert_ref(out.logits, v["gen_logits"], "logits, pad positions included")
    assert_ref(out.hidden_states[-1], v["gen_final_hidden"], "final layernorm output")
    assert_ref(torch.stack(out.hidden_states), v["gen_hidden_states"], "hidden states")


@pytest.mark.parametrize("impl", IMPLS)
def test_explicit_original_4d_mask_and_positions_match_reference(case_a, impl):
    model, v = case_a
    model.config.attn_impl = impl
    with torch.no_grad():
        out = model(v["gen_input_ids"], attention_mask=v["gen_attention_mask"], position_ids=v["gen_position_ids"])
    assert_ref(out.logits, v["gen_logits"], "logits with the tokenizer's own mask and positions")


def test_forward_without_a_mask_treats_pads_as_context_like_the_original(case_a):
    model, v = case_a
    model.config.attn_impl = "sdpa"
    with torch.no_grad():
        logits = model(v["gen_input_ids"]).logits
    assert_compact_logits(logits, v, "gen_modeldefault")


@pytest.mark.parametrize("impl", IMPLS)
def test_training_loss_and_logits_match_reference(case_a, case_b, impl):
    for model, v in (case_a, case_b):
        model.config.attn_impl = impl
        with torch.no_grad():
            out = model(v["train_input_ids"], labels=v["train_labels"], output_hidden_states=True)
        assert abs(out.loss.item() - v["train_loss"].item()) <= 1e-4
        assert_ref(out.hidden_states[-1], v["train_final_hidden"], "train final hidden")
        if "train_logits" in v:
            assert_ref(out.logits, v["train_logits"], "train logits")
        else:
            assert_compact_logits(out.logits, v, "train")


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_generation_from_a_2d_mask_matches_reference(case_a, impl):
    model, v = case_a
    model.config.attn_impl = impl
    out = model.generate(v["gen_input_ids"], attention_mask=left_pad_mask(v["gen_input_ids"]), do_sample=False,
                         max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, v["gen_output_ids"])
    scores = torch.stack(out.scores)
    assert_ref(torch.logsumexp(scores, dim=-1), v["gen_step_logsumexp"], "per-step logsumexp")
    assert_ref(scores.gather(-1, v["gen_step_top8_indices"]), v["gen_step_top8_values"], "per-step top-8")
    assert_ref(scores[..., v["logit_cols"]], v["gen_step_scores_cols"], "per-step logit columns")


@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_tuned_model_matches_reference(case_b, impl):
    model, v = case_b
    model.config.attn_impl = impl
    with torch.no_grad():
        out = model(v["gen_input_ids"], output_hidden_states=True)
    assert_ref(out.logits, v["gen_logits"], "logits with the p-tuning v2 prefix")
    assert_ref(torch.stack(out.hidden_states), v["gen_hidden_states"], "hidden states with the prefix")
    gen = model.generate(v["gen_input_ids"], do_sample=False, max_new_tokens=8, output_scores=True,
                         return_dict_in_generate=True)
    assert torch.equal(gen.sequences, v["gen_output_ids"])
    assert_ref(torch.stack(gen.scores), v["gen_step_scores"], "per-step scores with the prefix")


def test_prefix_key_values_are_the_reshaped_prefix_encoder_output(case_b):
    model, v = case_b
    prompt = model.transformer.get_prompt(1, torch.float32, torch.device("cpu"))
    stacked = torch.stack([torch.stack((k[0].transpose(0, 1), val[0].transpose(0, 1))) for k, val in prompt])
    assert torch.equal(stacked, v["prefix_past_key_values"])


def test_ptv2_checkpoint_loads_onto_base_weights_and_matches_reference(case_b):
    _, v = case_b
    folder = require_shared("reference", "vectors", "chatglm6b_B")
    model, _ = load_case("chatglm6b_B")
    with torch.no_grad():
        model.transformer.prefix_encoder.embedding.weight.zero_()
    prefix = load_file(folder / "prefix_encoder.safetensors")
    result = model.load_state_dict(prefix, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        assert_ref(model(v["gen_input_ids"]).logits, v["gen_logits"], "logits after loading the ptv2 file")


@pytest.mark.parametrize("impl", IMPLS)
def test_same_weights_without_prefix_match_noprefix_reference(impl):
    model, v = load_case("chatglm6b_B", pre_seq_len=None)
    model.config.attn_impl = impl
    with torch.no_grad():
        assert_ref(model(v["gen_input_ids"]).logits, v["noprefix_gen_logits"], "logits without the prefix")
    gen = model.generate(v["gen_input_ids"], do_sample=False, max_new_tokens=8)
    assert torch.equal(gen, v["noprefix_gen_output_ids"])


def test_rotary_tables_use_the_float16_rounded_inv_freq_of_the_original():
    rotary = RotaryEmbedding(64)
    exact = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert torch.equal(rotary.inv_freq, exact.half().float())
    positions = torch.arange(2048).expand(2, -1)[None]
    cos, sin = rotary.tables(positions, torch.float32)
    angles = torch.arange(2048, dtype=torch.float32)[:, None] * exact.half().float()
    torch.testing.assert_close(cos[0, :, 0, :64], torch.cat((angles, angles), -1).cos(), rtol=0, atol=1e-6)
    unrounded = (torch.arange(2048, dtype=torch.float32)[:, None] * exact).sin()
    assert (sin[0, :, 0, :64] - torch.cat((unrounded, unrounded), -1)).abs().max() > 1e-2
    # an fp16 model builds the tables in fp16, as the original does
    cos16, _ = rotary.to(torch.float16).tables(positions, torch.float16)
    angles16 = torch.arange(2048, dtype=torch.float16)[:, None] * exact.half()
    assert torch.equal(cos16[0, :, 0, :64], torch.cat((angles16, angles16), -1).cos())


# ---------------------------------------------------------------- contract on a tiny random model


def tiny_model(seed: int = 0, **overrides) -> ChatGLMForConditionalGeneration:
    """2 layers, hidden 32, with the reference recipe's weight scaling so greedy decoding does not repeat."""
    return sharp_v1_model(seed, **overrides)


PROMPTS = [[10, 11, 12, 13, GMASK, SOP], [20, 21, 22, 23, 24, 25, 26, GMASK, SOP]]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    return ids, left_pad_mask(ids)


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_cache_generation_equals_full_forward_without_cache(impl):
    model = tiny_model(attn_impl=impl)
    ids, mask = left_padded(PROMPTS)
    cached = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, output_scores=True,
                            return_dict_in_generate=True)
    uncached = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    assert len(set(cached.sequences[0, ids.shape[1]:].tolist())) > 1, "degenerate model: tokens repeat"
    full_mask = torch.cat((mask, torch.ones(2, 6, dtype=torch.long)), dim=1)
    with torch.no_grad():
        full = model(cached.sequences, attention_mask=full_mask, use_cache=False).logits
    steps = full[:, ids.shape[1] - 1 : -1].transpose(0, 1)
    torch.testing.assert_close(torch.stack(cached.scores), steps, rtol=0, atol=1e-5)


def test_left_padded_batch_rows_equal_each_row_alone():
    model = tiny_model()
    ids, mask = left_padded(PROMPTS)
    batch = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=5)
        assert batch[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()
        with torch.no_grad():
            alone_logits = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(batch_logits[row, -len(prompt):], alone_logits, rtol=0, atol=1e-5)


def test_packed_samples_with_block_diagonal_mask_equal_each_sample_alone():
    model = tiny_model()
    samples = [torch.tensor([10, 11, GMASK, SOP, 30, 31]), torch.tensor([12, 13, 14, GMASK, SOP, 32, 33])]
    ids = torch.cat(samples)[None]
    masks = [glm_attention_mask(s[None], bos_token_id=SOP)[0, 0] for s in samples]
    packed_mask = torch.block_diag(*[~m for m in masks]).logical_not()[None, None]
    positions = torch.cat([glm_position_ids(s[None], bos_token_id=SOP, mask_token_id=MASK,
                                            gmask_token_id=GMASK) for s in samples], dim=-1)
    with torch.no_grad():
        packed = model(ids, attention_mask=packed_mask, position_ids=positions).logits[0]
        alone = torch.cat([model(s[None]).logits[0] for s in samples])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_logits_to_keep_returns_only_the_last_positions():
    model = tiny_model()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        full, last = model(ids).logits, model(ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, 128)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def training_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[10, 11, 12, GMASK, SOP, 40, 41, 42, EOP, PAD], [20, 21, GMASK, SOP, 50, 51, EOP, PAD, PAD, PAD]])
    labels = torch.where((ids == PAD) | (torch.arange(10) < torch.tensor([[4], [3]])), -100, ids)
    return ids, labels


def test_loss_is_the_mean_over_labelled_tokens_or_the_sum_over_num_items_in_batch():
    model = tiny_model()
    ids, labels = training_batch()
    with torch.no_grad():
        out = model(ids, labels=labels)
        token_nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
        valid = labels[:, 1:] != -100
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss
    torch.testing.assert_close(out.loss, token_nll[valid].mean())
    torch.testing.assert_close(summed, token_nll[valid].sum() / 20)


@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(pre_seq_len):
    ids, labels = training_batch()
    results = []
    for checkpointing in (False, True):
        model = tiny_model(pre_seq_len=pre_seq_len).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        calls = []
        model.transformer.layers[0].attention.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(7)  # same prefix dropout in both runs
        loss = model(ids, labels=labels).loss
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1), "the backward pass must recompute the layer"
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    if pre_seq_len:
        assert "transformer.prefix_encoder.embedding.weight" in grads_ckpt
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_prefix_dropout_is_active_only_in_training():
    model = tiny_model(pre_seq_len=3)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
        torch.manual_seed(1)
        trained = model.train()(ids).logits
    assert torch.equal(first, second)
    assert not torch.allclose(first, trained)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_peft_wraps_trains_one_step_saves_and_reloads(tmp_path, method):
    base = tiny_model()
    ids, labels = training_batch()
    if method == "lora":
        peft_config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["query_key_value"], r=4, lora_alpha=8)
    else:
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    model = get_peft_model(copy.deepcopy(base), peft_config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True))
    model.eval()
    prompt_ids, prompt_mask = left_padded(PROMPTS)
    with torch.no_grad():
        logits = model(input_ids=prompt_ids, attention_mask=prompt_mask).logits
    generated = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, max_new_tokens=4)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=prompt_ids, attention_mask=prompt_mask).logits, logits)
    again = reloaded.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, max_new_tokens=4)
    assert torch.equal(again, generated)
    # generation (cache + positions from generate) agrees with one full forward over the generated sequence
    full_mask = torch.cat((prompt_mask, torch.ones(2, 4, dtype=torch.long)), dim=1)
    with torch.no_grad():
        full = reloaded(input_ids=generated, attention_mask=full_mask).logits
    assert torch.equal(full[:, prompt_ids.shape[1] - 1 : -1].argmax(-1), generated[:, prompt_ids.shape[1]:])


def test_save_pretrained_writes_original_keys_and_reloads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "chatglm" and saved["architectures"] == ["ChatGLMForConditionalGeneration"]
    for key in ("num_layers", "inner_hidden_size", "position_encoding_2d", "gmask_token_id", "pre_seq_len"):
        assert key in saved
    reloaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_half_precision_paths_agree_with_float32():
    model = tiny_model()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        half = copy.deepcopy(model).half()
        for impl in IMPLS:
            half.config.attn_impl = impl
            logits = half(ids, attention_mask=mask).logits.float()
            assert torch.isfinite(logits).all()
            assert (logits - reference).norm() / reference.norm() < 1e-2


def test_inputs_that_cannot_define_positions_are_rejected():
    model = tiny_model()
    with pytest.raises(InvalidInputError, match="no <sop>"):
        model(torch.tensor([[10, 11, GMASK, 12]]))
    with pytest.raises(InvalidInputError, match="position_ids"):
        model(torch.tensor([PROMPTS[0]]), position_ids=torch.zeros(1, len(PROMPTS[0]), dtype=torch.long))
    with pytest.raises(InvalidInputError, match="attn_impl"):
        ChatGLMConfig(attn_impl="flash")


@pytest.mark.parametrize(("kwargs", "where"), [
    ({}, "input_ids"),
    ({"input_ids": torch.tensor([[5, 6]]), "past_key_values": ((torch.zeros(1), torch.zeros(1)),)},
     "past_key_values"),
])
def test_bad_forward_arguments_are_named(kwargs, where) -> None:
    from glmtune.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=f"^{where}: "):
        tiny_model()(**kwargs)
