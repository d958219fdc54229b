"""The in-place KV cache gives the model exactly what transformers' DynamicCache gives it."""

from __future__ import annotations

import pytest
import torch
from glmtune_inference import kv_cache
from glmtune_inference.kv_cache import GrowingCache
from transformers.cache_utils import DynamicCache

from glmtune.modeling.checkpoint import model_classes
from glmtune.modeling.hf_compat import CACHE_NAME
from glmtune.modeling.tiny import tiny_config


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_decoding_past_the_spare_room_gives_the_same_logits_as_dynamic_cache(family, monkeypatch):
    monkeypatch.setattr(kv_cache, "ROOM", 3)  # grow the buffers several times within a short decode
    torch.manual_seed(0)
    model = model_classes(family)[1](tiny_config(family)).eval()
    config = model.config
    first = config.bos_token_id if family == "v1" else 64790
    prompt = torch.tensor([[5, 6, 7, 8, config.gmask_token_id if family == "v1" else 9, first]] * 2)
    prompt[1, :2] = config.pad_token_id
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # a left-padded row, as the serving batch has
    runs = []
    for cache in (DynamicCache(), GrowingCache()):
        with torch.inference_mode():
            out = model.generate(input_ids=prompt, attention_mask=mask, **{CACHE_NAME: cache}, do_sample=False,
                                 max_new_tokens=10, min_new_tokens=10, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=config.pad_token_id)
        runs.append((torch.stack(out.logits), cache))
    (expected, dynamic), (got, growing) = runs
    assert torch.equal(got, expected)
    for reference, layer in zip(dynamic.layers, growing.layers, strict=True):
        assert torch.equal(layer.keys, reference.keys) and torch.equal(layer.values, reference.values)
        assert layer._key_room.shape[-2] > layer.keys.shape[-2]  # appended in place, room left


def test_a_filled_cache_selects_rows_and_crops_like_dynamic_cache():
    keys = [torch.randn(3, 2, 5, 4) for _ in range(2)]
    values = [torch.randn(3, 2, 5, 4) for _ in range(2)]
    growing = GrowingCache(list(zip(keys, values, strict=True)))
    dynamic = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)))
    for cache in (growing, dynamic):
        cache.batch_select_indices(torch.tensor([2, 0]))
        cache.crop(-1)
        cache.update(torch.ones(2, 2, 1, 4), torch.zeros(2, 2, 1, 4), 0)
    assert growing.get_seq_length() == dynamic.get_seq_length() == 5
    for a, b in zip(growing.layers, dynamic.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
