"""The base model of a run: resolved (downloaded or created) once per work dir, loaded by every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from glmtune.errors import InvalidInputError


def prepare_base_model(spec: Any, workdir: Path) -> dict[str, Any]:
    """Make the base model available locally; returns what every rank needs to load it (JSON-able)."""
    from glmtune.modeling import families
    from glmtune.modeling.checkpoint import local_model_dir
    from glmtune.templates import template_for_family

    model = spec.spec.model
    if model.create is not None:
        from glmtune.modeling import create_model_dir

        path = workdir / "base-model"
        if not (path / "config.json").is_file():
            create_model_dir(model.family, model.create.size, path, seed=model.create.seed,
                             tokenizer=model.create.tokenizer, layout=model.create.layout or "remote")
    else:
        path = local_model_dir(model.uri)
    family = families.family(path)
    if family == "glm4":
        path = _glm4_remote(path, workdir, "spec.model.create" if model.create is not None else "spec.model.uri")
    if family == "v2" and model.family == "v3":
        family = "v3"  # ChatGLM3 shares ChatGLM2's architecture: the spec may say which it is
    if model.family is not None and {model.family, family} not in ({"v2", "v3"}, {family}):
        raise InvalidInputError(f"the checkpoint is a {family} model, not {model.family}", where="spec.model.family")
    template = spec.spec.data.template
    quant = model.quantization
    return {
        "path": str(path),
        "family": family,
        "template": template if template != "auto" else template_for_family(family),
        "dtype": spec.spec.model_dtype,
        "glmtune_bits": quant.bits if quant is not None and quant.backend == "glmtune" else None,
        "bnb_bits": quant.bits if quant is not None and quant.backend == "bitsandbytes" else None,
    }


def _glm4_remote(path: Path, workdir: Path, where: str) -> Path:
    """A GLM-4 base in the remote-code layout, which every method, quantization and export of glmtune runs on: an
    ``-hf`` base is converted once into the work dir (exactly: same logits), remembering its layout so the
    export goes back out in it."""
    from glmtune.modeling.glm4 import REMOTE
    from glmtune.modeling.glm4_checkpoint import checkpoint_layout, convert_to_remote

    if checkpoint_layout(path) == REMOTE:
        return path
    target = workdir / "base-model-remote"
    if not (target / "config.json").is_file():
        try:
            convert_to_remote(path, target)
        except InvalidInputError as error:
            raise InvalidInputError(str(error), where=where) from None
    return target


def load_training_model(base: dict[str, Any], overrides: dict[str, Any]) -> torch.nn.Module:
    """The base model as training needs it: glmtune's loader, or bitsandbytes layers for QLoRA."""
    from glmtune.modeling import load_model

    if not base.get("bnb_bits"):
        return load_model(base["path"], dtype=base["dtype"], quantization_bit=base["glmtune_bits"],
                          config_overrides=overrides)
    from glmtune.export_loading import load_bitsandbytes_base

    return load_bitsandbytes_base(base["path"], base["dtype"], _default_device(), base["bnb_bits"],
                                  config_overrides=overrides)


def _default_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
