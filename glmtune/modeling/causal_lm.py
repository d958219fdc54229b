"""What both model families do on top of their transformer: the LM forward (logits, loss) and `quantize`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from glmtune.errors import InvalidInputError
from glmtune.modeling.hf_compat import cache_field, output_cache, take_cache
from glmtune.modeling.loss import causal_lm_loss
from glmtune.modeling.projection import project_to_vocab
from glmtune.modeling.quantization import quantize_model


def check_model_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                       past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The base models' argument rules, raised as clear errors instead of failures deep in the forward;
    returns the KV cache the caller passed under either transformers name (see hf_compat)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise InvalidInputError("pass exactly one of input_ids and inputs_embeds", where="input_ids")
    return take_cache(past_key_values, cache)


class GLMCausalLM:
    """Mixin for `...ForConditionalGeneration`: needs `self.transformer`, `get_output_embeddings()` and
    `quantized_modules` (the block Linear suffixes weight-only quantization replaces)."""

    quantized_modules: tuple[str, ...]

    def quantize(self, bits: int):
        """Weight-only quantize the block Linears in place (8 or 4 bits), as the original `quantize()`."""
        if self.config.quantization_bit:
            raise InvalidInputError(f"model is already quantized to {self.config.quantization_bit} bits",
                                    where="quantization_bit")
        quantize_model(self.transformer, bits, self.quantized_modules)
        self.config.quantization_bit = bits
        return self

    def decode_position_ids(self, prompts: Sequence[Sequence[int]], generated: Sequence[int]) -> torch.Tensor | None:
        """Position ids (host tensor) of the tokens one decode step feeds, for unpadded `prompts` with `generated`
        answer tokens each; None when the model derives them from the mask itself (ChatGLM2/3). Lets a serving
        batcher advance left-padded rows without knowing the family."""
        return None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        if kwargs.get("output_attentions"):
            raise InvalidInputError("output_attentions is not available (attention runs through SDPA)",
                                    where="output_attentions")
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=take_cache(past_key_values, cache), inputs_embeds=inputs_embeds,
                               use_cache=use_cache, output_hidden_states=output_hidden_states)
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = project_to_vocab(out.last_hidden_state[:, kept], self.get_output_embeddings())
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **cache_field(output_cache(out)))
        return result.to_tuple() if return_dict is False else result
