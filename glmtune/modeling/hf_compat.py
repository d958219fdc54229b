"""The one place that knows which transformers API is installed; model code and tests go through it.

transformers 5.24 renamed the KV cache `past_key_values` -> `cache` everywhere: generate() hands the model
`cache=`, `prepare_inputs_for_generation` takes `cache`, model outputs hold `.cache` (the old names still work
until 6.0, each use logging a deprecation warning). Up to 5.23 only `past_key_values` exists. Our own callers
(the serving engine, peft 0.21's prefix tuning) pass `past_key_values`, so the models accept either name and
answer under the installed one. Their forward names both parameters: generate() refuses model kwargs that
neither prepare_inputs_for_generation nor forward names. Activation checkpointing was renamed in 5.23.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import fields

from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput

from glmtune.errors import InvalidInputError

# The name the installed transformers gives the cache in model outputs and in generate()'s model kwargs.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"
# Every name a caller may pass the cache under (accelerate's device placement must leave all of them alone).
CACHE_NAMES = ("past_key_values", "cache")


def take_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    """The one KV cache of a forward call that may get it as `past_key_values` or `cache`; refuses a non-Cache.

    Both at once happens with peft 0.21 prefix tuning under transformers >= 5.24: generate() keeps its running
    cache under `cache` while peft re-injects a fresh prefix-only cache under `past_key_values` every step. The
    running cache wins once it holds anything; at the first step (still empty) peft's prefix is the one to use.
    """
    for name, value in (("cache", cache), ("past_key_values", past_key_values)):
        if value is not None and not isinstance(value, Cache):
            raise InvalidInputError(f"the KV cache must be a transformers Cache (DynamicCache), got "
                                    f"{type(value).__name__}", where=name)
    if cache is None:
        return past_key_values
    if past_key_values is None or cache.get_seq_length() > 0:
        return cache
    return past_key_values


def cache_field(cache: Cache | None) -> dict[str, Cache | None]:
    """Keyword argument that puts `cache` into a transformers ModelOutput under the installed field name."""
    return {CACHE_NAME: cache}


def output_cache(output: ModelOutput) -> Cache | None:
    """The cache a model output carries, read under the installed name (no deprecation warning on 5.24+)."""
    return output.get(CACHE_NAME)


def enable_activation_checkpointing(model: PreTrainedModel, use_reentrant: bool = False) -> None:
    """Recompute each block's activations in the backward (non-reentrant by default, so frozen inputs work).

    transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old name
    warns from then on); older 5.x releases only have the old name.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@contextmanager
def peft_reads_deprecated_checkpointing():
    """Silence the one FutureWarning peft 0.21 triggers by reading transformers' renamed
    `is_gradient_checkpointing` (deprecated in 5.23) when it wraps or loads an adapter: not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        yield
