"""glmtune: fine-tune and serve ChatGLM-family models, on a laptop or on Kubernetes.

`import glmtune` stays torch-free (the operator image has no torch); the heavy entry points
`load_model` and `load_tokenizer` are resolved lazily on first use.
"""

from __future__ import annotations

from typing import Any

from glmtune.errors import GlmtuneError, InvalidInputError

__version__ = "0.1.0"
__all__ = ["GlmtuneError", "InvalidInputError", "load_model", "load_tokenizer", "__version__"]

_LAZY = {
    "load_model": "glmtune.modeling",
    "load_tokenizer": "glmtune.tokenization",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmtune' has no attribute {name!r}")
