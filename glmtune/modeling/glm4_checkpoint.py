"""GLM-4 checkpoints on disk in either published layout: load, save in a chosen layout, create tiny random ones.

Remote-code layout: glmtune's ChatGLM2/3 model and `save_pretrained` (THUDM's keys and config.json) with the
GLM-4 tokenizer's files. ``-hf`` layout (``model_type`` "glm"): transformers' own `GlmForCausalLM`, its own
config.json and a plain ``tokenizer.json``; `load_hf_as_remote` instead brings such a checkpoint into glmtune's
model (for what only that model has: p-tuning v2 prefixes, weight-only int8/int4 `quantize`). GLM-4-0414
(``model_type`` "glm4") is loaded and saved natively only: it has no remote-code twin.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmtune.errors import InvalidInputError
from glmtune.modeling.checkpoint_config import original_config, read_config_dict, resolve_dtype
from glmtune.modeling.checkpoint_io import iter_tensors, weight_files
from glmtune.modeling.checkpoint_save import ShardWriter, parse_size, staging_folder, write_config
from glmtune.modeling.glm4 import (
    HF,
    HF_0414,
    LAYOUTS,
    REMOTE,
    hf_model_class,
    layout_of_config,
    tiny_glm4_config,
)
from glmtune.modeling.glm4_convert import (
    hf_to_remote_config,
    hf_to_remote_state_dict,
    remote_to_hf_config,
    remote_to_hf_state_dict,
)


def checkpoint_layout(directory: str | os.PathLike[str]) -> str:
    """"remote", "hf" or "hf-0414" of a GLM-4 model directory (from its config.json)."""
    directory = Path(directory)
    return layout_of_config(read_config_dict(directory), where=str(directory / "config.json"))


def load_glm4(directory: str | os.PathLike[str], dtype: str | torch.dtype | None = None) -> nn.Module:
    """The model of a GLM-4 directory in the class of its layout: glmtune's for remote code, transformers'
    `GlmForCausalLM` / `Glm4ForCausalLM` for the ``-hf`` layouts (eval mode, on the CPU)."""
    layout = checkpoint_layout(directory)
    if layout == REMOTE:
        from glmtune.modeling.checkpoint import load_model

        return load_model(directory, dtype=dtype)
    raw = read_config_dict(Path(directory))
    torch_dtype = resolve_dtype(dtype, raw.get("torch_dtype") or raw.get("dtype"))
    return hf_model_class(layout).from_pretrained(str(directory), dtype=torch_dtype).eval()


def load_hf_as_remote(directory: str | os.PathLike[str], dtype: str | torch.dtype | None = None) -> nn.Module:
    """glmtune's model holding an ``-hf`` GlmForCausalLM checkpoint's weights, converted tensor for tensor."""
    from glmtune.modeling.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
    from glmtune.modeling.checkpoint import parameters_on_meta

    directory = Path(directory)
    raw = read_config_dict(directory)
    config = hf_to_remote_config(raw, where=str(directory / "config.json"))
    torch_dtype = resolve_dtype(dtype, config.get("torch_dtype"))
    state = {key: tensor.to(torch_dtype) for key, tensor, _ in iter_tensors(weight_files(directory))}
    with parameters_on_meta():
        model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**config))
    remote_state = hf_to_remote_state_dict(state, config, inv_freq=False)
    missing = set(model.state_dict()) - set(remote_state)
    if missing:
        raise InvalidInputError(f"weights missing for {', '.join(sorted(missing)[:5])}", where=str(directory))
    model.load_state_dict(remote_state, strict=True, assign=True)
    model.config.dtype = torch_dtype
    model.config._name_or_path = str(directory)
    return model.eval()


def save_glm4(model: nn.Module, out_dir: str | os.PathLike[str], layout: str = REMOTE, tokenizer: Any = None,
              max_shard_size: int | str = "2GB") -> Path:
    """Write `model` in `layout` ("remote" | "hf" | "hf-0414") with the tokenizer's files of that layout.

    glmtune's model saves as remote code or converts to ``-hf``; a native model saves natively (an ``-hf`` model
    to the remote layout: load it with `load_hf_as_remote` first). Staged, then moved into place.
    """
    from glmtune.modeling.chatglm2 import ChatGLM2ForConditionalGeneration

    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", where="layout")
    ours = isinstance(model, ChatGLM2ForConditionalGeneration)
    if layout == REMOTE and ours:
        from glmtune.modeling.checkpoint import save_pretrained

        return save_pretrained(model, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
    tokenizer_layout = "hf"
    with staging_folder(out_dir) as staging:
        if layout == HF and ours:
            dtype = model.get_input_embeddings().weight.dtype
            remote = original_config(model, "v2", dtype)
            writer = ShardWriter(staging, parse_size(max_shard_size))
            state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
            for key, tensor in remote_to_hf_state_dict(state, remote).items():
                writer.add(key, tensor.contiguous())
            writer.finish()
            config = remote_to_hf_config(remote)
            import transformers

            config["transformers_version"] = transformers.__version__
            write_config(staging, config)
        elif not ours and layout != REMOTE and isinstance(model, hf_model_class(layout)):
            model.save_pretrained(str(staging), max_shard_size=max_shard_size)
        else:
            raise InvalidInputError(f"a {type(model).__name__} cannot be saved in the {layout!r} layout (convert it "
                                    "first: load_hf_as_remote for remote code)", where="layout")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging, layout=tokenizer_layout)
    return Path(out_dir)


def _native_tiny(layout: str, remote_config: Any) -> nn.Module:
    """A native -hf model of the same shape as a tiny remote config (0414: its own class, same sizes)."""
    import transformers

    hf = remote_to_hf_config(original_config(_Shell(remote_config), "v2", torch.float32))
    fields = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config_class = transformers.GlmConfig if layout == HF else transformers.Glm4Config
    return hf_model_class(layout)(config_class(**fields))


class _Shell(nn.Module):
    """Just a `.config`, for reading a config's original keys without building the model."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


def create_glm4_model_dir(out_dir: str | os.PathLike[str], layout: str = REMOTE, size: str = "tiny", seed: int = 0,
                          tokenizer: Any = None) -> Path:
    """A random-init GLM-4 of `size` ("tiny" | "small") in `layout`, with `tokenizer` (a GLM4Tokenizer) or a
    freshly trained tiny one; the same arguments give the same weights."""
    import tempfile

    from glmtune.modeling.chatglm2 import ChatGLM2ForConditionalGeneration
    from glmtune.tokenization.glm4 import load_glm4_tokenizer, train_tiny_glm4_tokenizer

    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", where="layout")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError("already exists and is not an empty directory", where=str(out))
    if tokenizer is None:
        with tempfile.TemporaryDirectory(prefix="glmtune-glm4-tokenizer-") as scratch:
            tokenizer = load_glm4_tokenizer(train_tiny_glm4_tokenizer(scratch))
    config = tiny_glm4_config(size, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChatGLM2ForConditionalGeneration(config) if layout != HF_0414 else _native_tiny(layout, config)
    return save_glm4(model, out, layout, tokenizer)


# Written into a remote-layout copy made from an -hf checkpoint: the layout it came in, so an export of what was
# trained on the copy goes back out in that layout.
SOURCE_LAYOUT_FILE = "glmtune-source-layout.json"


def convert_to_remote(source: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      dtype: str | torch.dtype | None = None) -> Path:
    """A remote-code copy of the ``-hf`` GLM-4 checkpoint `source` in `out_dir` (weights converted tensor for
    tensor, the same tokenizer), which glmtune's loaders, quantization, p-tuning v2 and bitsandbytes all take;
    records the source layout (`source_layout`). GLM-4-0414 has no remote-code twin and is refused."""
    from glmtune.storage import atomic_write_json
    from glmtune.tokenization.glm4 import load_glm4_tokenizer

    source = Path(source)
    layout = checkpoint_layout(source)
    if layout != HF:
        raise InvalidInputError(f"only the -hf (GlmForCausalLM) layout converts to remote code, this is {layout!r}"
                                + (": GLM-4-0414 (Glm4ForCausalLM) has no remote-code twin and is not supported for "
                                   "training or serving by glmtune" if layout == HF_0414 else ""),
                                where=str(source / "config.json"))
    model = load_hf_as_remote(source, dtype)
    out = save_glm4(model, out_dir, REMOTE, load_glm4_tokenizer(source))
    atomic_write_json(out / SOURCE_LAYOUT_FILE, {"layout": layout, "source": str(source)})
    return out


def source_layout(directory: str | os.PathLike[str]) -> str:
    """The layout a GLM-4 checkpoint came in: what `convert_to_remote` recorded, else its own."""
    from glmtune.storage import read_json_object

    marker = Path(directory) / SOURCE_LAYOUT_FILE
    if marker.is_file():
        layout = read_json_object(marker).get("layout")
        if layout not in LAYOUTS:
            raise InvalidInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}",
                                    where=f"{marker}:layout")
        return str(layout)
    return checkpoint_layout(directory)
