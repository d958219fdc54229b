"""The v2 (ChatGLM2/3) model: reference vectors of the original code, cache, padding, checkpointing, peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from testkit import require_shared

from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration, padding_attention_mask
from glmtune.modeling.checkpoint import load_model
from glmtune.modeling.hf_compat import enable_activation_checkpointing


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """The suggested tolerance for a re-implementation: rtol 1e-4, atol 1e-4 * max|expected|."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(require_shared("reference", "vectors", "chatglm2_A", "vectors.safetensors")))


@pytest.fixture(scope="module")
def original() -> ChatGLM2ForConditionalGeneration:
    torch.set_num_threads(1)
    return load_model(require_shared("reference", "vectors", "chatglm2_A"))


def random_v2(seed: int = 0, **overrides) -> ChatGLM2ForConditionalGeneration:
    """A 2-layer MQA model with weights large enough that greedy decoding is not one repeated token."""
    settings = dict(num_layers=2, padded_vocab_size=128, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                    num_attention_heads=4, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
                    seq_length=256)
    torch.manual_seed(seed)
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**{**settings, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0.0, 0.25)
    return model.eval()


def left_padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_masks_built_from_2d_mask_equal_original_get_masks(reference) -> None:
    built = padding_attention_mask(reference["gen_attention_mask"], 10, 0, 2, torch.device("cpu"))
    assert torch.equal(built, reference["gen_full_attention_mask"])


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("with_positions", [True, False])
def test_padded_generation_forward_matches_original_logits_and_hidden_states(
    original, reference, attn_impl: str, with_positions: bool
) -> None:
    original.config.attn_impl = attn_impl
    inputs = {"input_ids": reference["gen_input_ids"], "attention_mask": reference["gen_attention_mask"]}
    if with_positions:
        inputs["position_ids"] = reference["gen_position_ids"]
    try:
        with torch.no_grad():
            out = original(**inputs, output_hidden_states=True)
            final = original.transformer(**inputs).last_hidden_state
    finally:
        original.config.attn_impl = "sdpa"
    assert_close(out.logits, reference["gen_logits"])
    assert_close(final, reference["gen_final_hidden"])
    # v2: inputs of every layer, then the last layer's output BEFORE the final RMSNorm
    assert_close(torch.stack(out.hidden_states), reference["gen_hidden_states"])


def test_training_batch_loss_and_logits_match_original(original, reference) -> None:
    with torch.no_grad():
        out = original(input_ids=reference["train_input_ids"], attention_mask=reference["train_attention_mask"],
                       position_ids=reference["train_position_ids"], labels=reference["train_labels"])
    assert abs(out.loss.item() - reference["train_loss"].item()) < 1e-4
    assert out.loss.dtype == torch.float32
    assert_close(out.logits, reference["train_logits"])


def test_greedy_generate_matches_original_tokens_and_step_scores(original, reference) -> None:
    with torch.no_grad():
        out = original.generate(input_ids=reference["gen_input_ids"], attention_mask=reference["gen_attention_mask"],
                                do_sample=False, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == reference["gen_output_ids"].tolist()
    assert_close(torch.stack(out.scores), reference["gen_step_scores"])


def test_generate_with_kv_cache_equals_without() -> None:
    model = random_v2()
    ids, mask = left_padded_batch()
    runs = []
    with torch.no_grad():
        for use_cache in (True, False):
            runs.append(model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                       use_cache=use_cache, output_scores=True, return_dict_in_generate=True))
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
    torch.testing.assert_close(torch.stack(runs[0].scores), torch.stack(runs[1].scores), rtol=0, atol=1e-5)


def test_left_padded_batch_generates_what_each_row_generates_alone() -> None:
    model = random_v2()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
        for row in range(ids.shape[0]):
            alone = model.generate(input_ids=ids[row : row + 1, mask[row].bool()], do_sample=False, max_new_tokens=6)
            assert batch[row, -6:].tolist() == alone[0, -6:].tolist()


def test_cache_holds_grouped_keys_batch_first() -> None:
    model = random_v2()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    layer = out.past_key_values.layers[0]
    assert tuple(layer.keys.shape) == (3, 2, 9, 16)  # [b, kv groups, seq, kv_channels]
    assert out.past_key_values.get_seq_length() == 9


def test_logits_to_keep_returns_only_the_last_positions() -> None:
    model = random_v2()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert last.shape == (3, 1, 128)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_packed_4d_block_mask_equals_samples_run_separately() -> None:
    model = random_v2()
    first, second = torch.randint(3, 128, (1, 5)), torch.randint(3, 128, (1, 4))
    packed = torch.cat((first, second), dim=1)
    keep = torch.zeros(9, 9, dtype=torch.bool)
    keep[:5, :5] = torch.ones(5, 5).tril().bool()
    keep[5:, 5:] = torch.ones(4, 4).tril().bool()
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with torch.no_grad():
        out = model(input_ids=packed, attention_mask=~keep[None, None], position_ids=positions).logits
        alone = [model(input_ids=first).logits, model(input_ids=second).logits]
    torch.testing.assert_close(out, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, ids, mask, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(3)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("overrides", [{}, {"pre_seq_len": 3}, {"pre_seq_len": 3, "prefix_projection": True}])
def test_gradient_checkpointing_keeps_loss_and_gradients(overrides) -> None:
    model = random_v2(**overrides).train()
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    plain_loss, plain = _loss_and_grads(model, ids, mask, labels)
    enable_activation_checkpointing(model)
    ckpt_loss, ckpt = _loss_and_grads(model, ids, mask, labels)
    assert plain and plain.keys() == ckpt.keys()
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=1e-6)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6)


def test_ptuning_v2_prefix_trains_only_the_prefix_and_generates_consistently() -> None:
    model = random_v2(pre_seq_len=4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "transformer.prefix_encoder.embedding.weight"]
    ids, mask = left_padded_batch()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=4,
                             output_scores=True, return_dict_in_generate=True)
        grown = torch.cat((mask, torch.ones(3, 3, dtype=mask.dtype)), dim=1)
        uncached = model(input_ids=out.sequences[:, :-1], attention_mask=grown).logits
    for step, scores in enumerate(out.scores):  # the prefix path differs in summation order: float32 noise only
        assert_close(scores, uncached[:, 8 + step], rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_peft_wraps_trains_saves_and_reloads(tmp_path, method: str) -> None:
    base_state = random_v2().state_dict()
    config = (LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["query_key_value"])
              if method == "lora" else PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    peft_model = get_peft_model(random_v2(), config)
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    peft_model.train()
    peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    torch.optim.SGD(trainable, lr=0.5).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
        generated = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=2,
                                        output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(generated.scores[0], logits[:, -1], rtol=0, atol=1e-5)
    peft_model.save_pretrained(tmp_path)
    base = random_v2()
    base.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, logits)


def test_resized_vocabulary_is_what_the_config_says() -> None:
    model = random_v2()
    model.resize_token_embeddings(160, mean_resizing=False)
    assert model.config.padded_vocab_size == model.config.vocab_size == 160
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[150, 3]])).logits.shape == (1, 2, 160)


@pytest.mark.parametrize(("kwargs", "where"), [
    ({}, "input_ids"),
    ({"input_ids": torch.tensor([[5, 6]]), "inputs_embeds": torch.zeros(1, 2, 64)}, "input_ids"),
    ({"input_ids": torch.tensor([[5, 6]]), "past_key_values": ((torch.zeros(1), torch.zeros(1)),)},
     "past_key_values"),
])
def test_bad_forward_arguments_are_named(kwargs, where) -> None:
    from glmtune.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=f"^{where}: "):
        random_v2()(**kwargs)
