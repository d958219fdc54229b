"""Tiny random ChatGLM-6B models with the reference recipe's weight scaling, shared by the model tests: greedy
decoding of a plainly initialised tiny model repeats one token, which would hide generation bugs."""

from __future__ import annotations

import torch
from torch import nn

from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration

# Special ids of the tiny v1 vocabulary (128 rows).
PAD, MASK, GMASK, SOP, EOP = 3, 100, 101, 104, 105
_SCALE = {"query_key_value": 2.0, "dense": 8.0, "dense_h_to_4h": 8.0, "dense_4h_to_h": 8.0}


def sharp_v1_model(seed: int = 0, **overrides) -> ChatGLMForConditionalGeneration:
    """2 layers, hidden 32, weights scaled up per Linear kind, in eval mode."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4, inner_hidden_size=64,
                    max_sequence_length=64, bos_token_id=SOP, eos_token_id=EOP, mask_token_id=MASK,
                    gmask_token_id=GMASK, pad_token_id=PAD)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**{**settings, **overrides}))
    with torch.no_grad():
        nn.init.normal_(model.transformer.word_embeddings.weight)
        for name, module in model.transformer.layers.named_modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
                module.weight.mul_(_SCALE[name.rsplit(".", 1)[-1]])
    return model.eval()
