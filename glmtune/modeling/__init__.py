"""ChatGLM model code: v1 (ChatGLM-6B) and v2 (ChatGLM2/3), checkpoint I/O, quantization, tiny models.

Names resolve lazily so that importing this package (e.g. for the `glmtune model` command's parser) does not
import torch. Resolving a model or config class also registers both families with transformers' Auto
classes (model types "chatglm" and "chatglm2").
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ChatGLM2Config",
    "ChatGLM2ForConditionalGeneration",
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "create_model_dir",
    "family_of_config",
    "load_model",
    "register_auto_classes",
    "save_pretrained",
    "tiny_config",
]

_LAZY = {
    "ChatGLM2Config": "glmtune.modeling.chatglm2",
    "ChatGLM2ForConditionalGeneration": "glmtune.modeling.chatglm2",
    "ChatGLMConfig": "glmtune.modeling.chatglm6b",
    "ChatGLMForConditionalGeneration": "glmtune.modeling.chatglm6b",
    "family_of_config": "glmtune.modeling.checkpoint",
    "load_model": "glmtune.modeling.checkpoint",
    "save_pretrained": "glmtune.modeling.checkpoint",
    "create_model_dir": "glmtune.modeling.tiny",
    "tiny_config": "glmtune.modeling.tiny",
}
_registered = False


def register_auto_classes() -> None:
    """Register both families with AutoConfig / AutoModelForCausalLM (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
    from glmtune.modeling.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration

    for config, model in ((ChatGLMConfig, ChatGLMForConditionalGeneration),
                          (ChatGLM2Config, ChatGLM2ForConditionalGeneration)):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForCausalLM.register(config, model, exist_ok=True)
    _registered = True


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        if name.startswith("ChatGLM") or name == "load_model":
            register_auto_classes()
        return value
    raise AttributeError(f"module 'glmtune.modeling' has no attribute {name!r}")
