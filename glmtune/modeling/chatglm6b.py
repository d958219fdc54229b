"""ChatGLM-6B ("v1"): config and model with THUDM's parameter names, matching the original code's numerics.

Inputs: `attention_mask` is a 2-D 0/1 padding mask (any padding side; the prefix-LM mask and the 2D position
ids are built from it and `input_ids` exactly as the original tokenizer/model build them), an explicit 4-D
bool mask [b, 1, q, k] with True = masked (the original convention, used for packing), or None (no padding).
`position_ids` are [b, 2, q] (positions, block positions); built when absent. Key columns not covered by the
mask (a p-tuning prefix) are always visible. See chatglm6b_masks.py and chatglm6b_layers.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from glmtune.errors import InvalidInputError, check_fields
from glmtune.modeling.causal_lm import GLMCausalLM, check_model_inputs
from glmtune.modeling.chatglm6b_layers import GLMBlock, PrefixEncoder, RotaryEmbedding, original_inv_freq
from glmtune.modeling.chatglm6b_masks import decode_position_ids, glm_position_ids, prefix_lm_keep, sop_index
from glmtune.modeling.hf_compat import CACHE_NAMES, cache_field
from glmtune.modeling.quantization import QuantizedLinear, quantize_model

# The Linear layers the original quantizes (chatglm-6b-int4/-int8); the embedding and lm_head stay float.
QUANTIZED_MODULES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
PREFIX_DROPOUT = 0.1


class ChatGLMConfig(PretrainedConfig):
    """The original ChatGLM-6B `config.json` keys (defaults: the 130528-token release); `attn_impl` is
    glmtune's switch between SDPA ("sdpa") and the original arithmetic ("math")."""

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    pad_token_id: int | None = 3
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    quantization_bit: int = 0
    use_cache: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    attn_impl: str = "sdpa"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        checks = [
            ("attn_impl", self.attn_impl in ("sdpa", "math"), "must be 'sdpa' or 'math'"),
            ("quantization_bit", self.quantization_bit in (0, 4, 8), "must be 0, 4 or 8"),
            ("position_encoding_2d", self.position_encoding_2d is True,
             "must be true: every released ChatGLM-6B checkpoint uses 2D rotary positions"),
            ("num_attention_heads", self.hidden_size % (4 * self.num_attention_heads) == 0,
             "must divide hidden_size into heads whose size is a multiple of 4 (two rotary halves)"),
            ("pre_seq_len", self.pre_seq_len is None or self.pre_seq_len > 0, "must be null or positive"),
        ]
        check_fields(self, checks, prefix="config.")


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Weight init and the transformers plumbing shared by the base model and the LM head model."""

    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _skip_keys_device_placement = list(CACHE_NAMES)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, original_inv_freq(module.dim))
        elif isinstance(module, QuantizedLinear):
            for tensor in (module.weight, module.weight_scale, module.bias):
                if tensor is not None:
                    init.zeros_(tensor)


class ChatGLMModel(ChatGLMPreTrainedModel):
    """Embedding, GLM blocks, final LayerNorm, and the optional p-tuning v2 prefix encoder."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        if config.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def get_prompt(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """Per-layer p-tuning v2 (key, value) [b, heads, pre_seq_len, head_dim], without rotary."""
        cfg = self.config
        tokens = torch.arange(cfg.pre_seq_len, device=device).expand(batch_size, -1)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv = self.prefix_encoder(tokens).to(dtype)
        kv = kv.view(batch_size, cfg.pre_seq_len, cfg.num_layers * 2, cfg.num_attention_heads, head_dim)
        kv = self.prefix_dropout(kv).permute(2, 0, 3, 1, 4)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(cfg.num_layers)]

    def _keep_mask(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int, q: int, key_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep [b, 1, q, key_len] True = may attend, 2-D 0/1 mask of the current tokens or None)."""
        device = self.word_embeddings.weight.device
        current = None
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool:
                raise InvalidInputError("a 4-D attention_mask must be bool with True = masked", where="attention_mask")
            if attention_mask.shape[0] != batch or attention_mask.shape[2] != q or attention_mask.shape[3] > key_len:
                raise InvalidInputError(
                    f"4-D attention_mask shape {tuple(attention_mask.shape)} does not fit [b={batch}, 1, q={q}, "
                    f"k<={key_len}]", where="attention_mask")
            keep = ~attention_mask.to(device)
        else:
            if attention_mask is not None and attention_mask.dim() != 2:
                raise InvalidInputError("attention_mask must be 2-D (0/1) or 4-D (bool)", where="attention_mask")
            mask2d = torch.ones(batch, q, device=device) if attention_mask is None else attention_mask.to(device)
            if not q <= mask2d.shape[1] <= key_len:
                raise InvalidInputError(
                    f"2-D attention_mask covers {mask2d.shape[1]} tokens; expected between the {q} new tokens "
                    f"and the {key_len} keys (cache included)", where="attention_mask")
            real = mask2d.bool()
            past = mask2d.shape[1] - q
            current = real[:, past:]
            sop = (sop_index(input_ids, current, self.config.bos_token_id) if input_ids is not None
                   else torch.zeros(batch, dtype=torch.long, device=device))
            keep = torch.cat((real[:, None, None, :past] & current[:, None, :, None], prefix_lm_keep(sop, current)), -1)
        leading = key_len - keep.shape[-1]
        if leading:
            keep = torch.cat((keep.new_ones(batch, 1, q, leading), keep), dim=-1)
        return keep, current

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = check_model_inputs(input_ids, inputs_embeds, past_key_values, cache)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, q = inputs_embeds.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        own_prefix = self.config.pre_seq_len or 0
        prompt = self.get_prompt(batch, inputs_embeds.dtype, inputs_embeds.device) if own_prefix and not cached else None
        no_prefix = [(None, None)] * len(self.layers)
        if use_cache:
            past_key_values = past_key_values if past_key_values is not None else DynamicCache(config=self.config)
            for i, (key, value) in enumerate(prompt or []):
                past_key_values.update(key, value, i)
            layer_prefix, layer_cache = no_prefix, past_key_values
        elif cached:  # read the given cache (e.g. peft's prefix) without growing it
            layer_prefix = [(layer.keys, layer.values) for layer in past_key_values.layers]
            layer_cache = None
        else:
            layer_prefix, layer_cache = prompt or no_prefix, None
        key_len = cached + (own_prefix if prompt is not None else 0) + q
        keep, current = self._keep_mask(input_ids, attention_mask, batch, q, key_len)
        if position_ids is None:
            if input_ids is None:
                raise InvalidInputError("inputs_embeds without input_ids needs position_ids [b, 2, L]",
                                        where="position_ids")
            position_ids = glm_position_ids(input_ids, current, bos_token_id=self.config.bos_token_id,
                                            mask_token_id=self.config.mask_token_id,
                                            gmask_token_id=self.config.gmask_token_id)
            # Keys before the new tokens that are not our own prefix (peft's prefix tuning): peft shifts explicit
            # position ids by their count, so derived ones are shifted alike to keep training == generation.
            position_ids = position_ids + max(key_len - q - own_prefix, 0)
        elif tuple(position_ids.shape) != (batch, 2, q):
            raise InvalidInputError(f"position_ids must be [b, 2, L] = [{batch}, 2, {q}], got "
                                    f"{tuple(position_ids.shape)}", where="position_ids")
        empty_rows = ~keep.any(dim=-1, keepdim=True)
        if bool(keep.all()):
            keep, empty_rows = None, None
        elif not bool(empty_rows.any()):
            empty_rows = None
        rotary = self.layers[0].attention.rotary_emb.tables(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)
        hidden, all_hidden = inputs_embeds, []
        for layer, (prefix_key, prefix_value) in zip(self.layers, layer_prefix, strict=True):
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden = layer(hidden, prefix_key, prefix_value, rotary=rotary, keep=keep, empty_rows=empty_rows,
                           past_key_values=layer_cache)
        hidden = self.final_layernorm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **cache_field(past_key_values if use_cache else None),
        )


class ChatGLMForConditionalGeneration(GLMCausalLM, ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its LM head (tied to the embedding unless the checkpoint holds a different lm_head)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    quantized_modules = QUANTIZED_MODULES

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.quantization_bit:
            quantize_model(self.transformer, config.quantization_bit, QUANTIZED_MODULES, empty_init=True)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def decode_position_ids(self, prompts: Sequence[Sequence[int]], generated: Sequence[int]) -> torch.Tensor:
        """[b, 2, 1]: each new token keeps its prompt's [gMASK] position while its block position counts on (left
        padding would shift what the model derives from the mask, so decode steps are told)."""
        return decode_position_ids(prompts, generated, bos_token_id=self.config.bos_token_id,
                                   mask_token_id=self.config.mask_token_id, gmask_token_id=self.config.gmask_token_id)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> dict:
        """The base preparation (what to feed this step, the cache), then position ids for the whole sequence
        so far (each new token: the [gMASK] index, block position +1) cut to the tokens it feeds.

        generate() itself supplies 1-D cumsum position ids, which do not apply to ChatGLM-6B and are replaced;
        [b, 2, L] ids given to generate() cannot be extended by it and are refused. Cutting here rather than
        in the base method keeps the result independent of how it slices (5.0 and 5.1 cut dim 1). The
        cache and everything else pass through `kwargs`, under whichever name the installed transformers uses."""
        given = kwargs.pop("position_ids", None)
        if given is not None and given.dim() == 3:
            raise InvalidInputError("generate() builds ChatGLM-6B position ids from input_ids and attention_mask; "
                                    "do not pass [b, 2, L] position_ids", where="position_ids")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise InvalidInputError("generate() takes the 2-D 0/1 attention_mask (left padding)",
                                    where="attention_mask")
        model_inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        fed = model_inputs.get("input_ids")
        fed = fed if fed is not None else model_inputs["inputs_embeds"]
        positions = glm_position_ids(
            input_ids, attention_mask, bos_token_id=self.config.bos_token_id,
            mask_token_id=self.config.mask_token_id, gmask_token_id=self.config.gmask_token_id)
        model_inputs["position_ids"] = positions[..., -fed.shape[1]:]
        return model_inputs
