"""The transposed output projection (`--output-layout auto` on CPU) is a pure speed change: same greedy tokens
and logits within 1e-5 relative of nn.Linear for every export kind, one copy of the (tied) weight, and the
sharing between a base and its adapters kept."""

from __future__ import annotations

import argparse

import pytest
import torch
from glmtune_inference.batching import DecodeBatch, Sequence
from glmtune_inference.cli import _load_options, register
from glmtune_inference.generation import TextDeltaDecoder
from glmtune_inference.loading import LoadOptions
from glmtune_inference.output_layout import TransposedEmbedding, TransposedLinear
from transformers.cache_utils import DynamicCache

from glmtune.errors import InvalidInputError

QUERIES = ("你好", "从南京到上海的路线", "Hello, world! How are you doing today?")
KINDS = ("base", "full", "adapter", "prefix")


def only(models):
    assert len(models) == 1
    return next(iter(models.values()))


def inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def greedy_tokens(served_model, query, max_new_tokens=12):
    batch = DecodeBatch(served_model.model, served_model.prefix_len, served_model.family)
    seq = Sequence(served_model.encode(query), served_model.params(do_sample=False, max_new_tokens=max_new_tokens),
                   TextDeltaDecoder(served_model.tokenizer))
    batch.prefill(seq)
    while not seq.finished:
        batch.step()
        batch.remove_finished()
    return seq.generated


@torch.inference_mode()
def step_logits(served_model, query, steps=4):
    """Logits of every prompt position, then of `steps` greedy decode steps through the KV cache."""
    model = served_model.model
    ids = torch.tensor([served_model.encode(query)])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=DynamicCache(), use_cache=True)
    logits, mask = [out.logits[0]], torch.ones_like(ids)
    glm = served_model.family == "v1"
    if glm:
        from glmtune.modeling.chatglm6b_masks import glm_position_ids

        config = model.config
        anchor = glm_position_ids(ids, None, bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
                                  gmask_token_id=config.gmask_token_id)[0, :, -1].tolist()
    for n in range(1, steps + 1):
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
        positions = torch.tensor([[[anchor[0]], [anchor[1] + n]]]) if glm else None
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=out.past_key_values,
                    use_cache=True)
        logits.append(out.logits[0])
    return torch.cat(logits)


def load(exports, served, kind, family, layout):
    if kind in ("adapter", "prefix"):  # over the base, as `serve --adapter` does, so sharing is exercised
        return served(exports.get("base", family), {kind: exports.get(kind, family)}, name="glm",
                      output_layout=layout)[kind]
    return only(served(exports.get(kind, family), output_layout=layout))


@pytest.mark.parametrize("family", ["v1", "v2"])
@pytest.mark.parametrize("kind", KINDS)
def test_transposed_layout_gives_the_same_tokens_and_logits(exports, served, family, kind):
    fast, standard = (load(exports, served, kind, family, layout) for layout in ("auto", "standard"))
    assert type(inner(fast.model).get_output_embeddings()) is TransposedLinear
    assert type(inner(standard.model).get_output_embeddings()) is torch.nn.Linear
    for query in QUERIES:
        got, want = step_logits(fast, query), step_logits(standard, query)
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert greedy_tokens(fast, query) == greedy_tokens(standard, query)


def _storage_bytes(model):
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_tied_v1_weight_is_held_once_by_output_and_embedding(exports, served):
    fast = inner(only(served(exports.get("base", "v1"), output_layout="auto")).model)
    standard = inner(only(served(exports.get("base", "v1"), output_layout="standard")).model)
    output, embedding = fast.get_output_embeddings(), fast.get_input_embeddings()
    assert type(embedding) is TransposedEmbedding
    assert embedding.weight_t is output.weight_t and output.weight_t.is_contiguous()
    assert output.weight_t.shape == (fast.config.hidden_size, fast.config.vocab_size)
    assert _storage_bytes(fast) == _storage_bytes(standard)
    ids = torch.tensor([[5, 17, 5, 3], [0, 1, 2, 3]])
    assert torch.equal(embedding(ids), standard.get_input_embeddings()(ids))


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_adapters_share_the_base_transposed_weight(exports, served, family):
    models = served(exports.get("base", family), {"lora": exports.get("adapter", family),
                                                  "ptv2": exports.get("prefix", family)}, name="glm")
    base_output = inner(models["glm"].model).get_output_embeddings()
    base_input = inner(models["glm"].model).get_input_embeddings()
    for name in ("lora", "ptv2"):
        tree = inner(models[name].model)
        assert tree.get_output_embeddings().weight_t.data_ptr() == base_output.weight_t.data_ptr(), name
        assert tree.get_input_embeddings().weight.data_ptr() == base_input.weight.data_ptr(), name
    assert greedy_tokens(models["lora"], "你好") == greedy_tokens(
        load(exports, served, "adapter", family, "standard"), "你好")


def test_auto_keeps_bfloat16_weights_standard(exports, served):
    model = inner(only(served(exports.get("base", "v2"), dtype="bfloat16")).model)
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_an_unknown_output_layout_is_an_input_error():
    with pytest.raises(InvalidInputError, match="auto, standard") as err:
        LoadOptions(output_layout="sideways")
    assert err.value.where == "output_layout"


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_output_layout_flag_reaches_the_load_options(command):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert _load_options(parser.parse_args([command, "m"])).output_layout == "auto"
    assert _load_options(parser.parse_args([command, "m", "--output-layout", "standard"])).output_layout == "standard"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "m", "--output-layout", "sideways"])


def test_a_memory_mapped_original_gives_its_pages_back_and_keeps_its_values(tmp_path):
    from glmtune_inference.output_layout import release_mapped_pages

    path = tmp_path / "weights.bin"
    torch.arange(1 << 20, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=1 << 20, dtype=torch.float32)
    assert mapped.sum().item() > 0  # touch every page
    assert release_mapped_pages(mapped) >= (4 << 20) - 2 * 4096
    assert torch.equal(mapped, torch.arange(1 << 20, dtype=torch.float32))  # re-read from the file
    assert release_mapped_pages(torch.ones(1 << 20)) == 0  # anonymous memory is never touched
