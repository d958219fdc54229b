"""GLM-4 checkpoints on disk: both published layouts written, read back by glmtune and by plain transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmForCausalLM

from glmtune.errors import InvalidInputError
from glmtune.modeling.chatglm2 import QUANTIZED_MODULES as V2_QUANTIZED
from glmtune.modeling.chatglm2 import ChatGLM2ForConditionalGeneration
from glmtune.modeling.glm4 import HF, HF_0414, LORA_TARGETS, QUANTIZED_MODULES, REMOTE, is_glm4_dir
from glmtune.modeling.glm4_checkpoint import (
    checkpoint_layout,
    create_glm4_model_dir,
    load_glm4,
    load_hf_as_remote,
    save_glm4,
)
from glmtune.tokenization.glm4 import load_glm4_tokenizer, train_tiny_glm4_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_glm4_tokenizer(train_tiny_glm4_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm4")
    return {layout: create_glm4_model_dir(root / layout, layout, seed=3, tokenizer=tokenizer)
            for layout in (REMOTE, HF)}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_both_layouts_of_one_seed_load_in_their_own_classes_with_equal_logits(dirs: dict[str, Path],
                                                                              tokenizer) -> None:
    remote, hf = load_glm4(dirs[REMOTE]), load_glm4(dirs[HF])
    assert isinstance(remote, ChatGLM2ForConditionalGeneration) and isinstance(hf, GlmForCausalLM)
    assert checkpoint_layout(dirs[REMOTE]) == REMOTE and checkpoint_layout(dirs[HF]) == HF
    ids = torch.tensor([tokenizer.encode("你好！今天天气怎么样？")])
    theirs = _logits(hf, ids)
    assert ((_logits(remote, ids) - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


def test_hf_layout_is_plain_transformers(dirs: dict[str, Path], tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(dirs[HF]))
    plain = AutoTokenizer.from_pretrained(str(dirs[HF]))
    assert type(model).__name__ == "GlmForCausalLM" and is_glm4_dir(dirs[HF]) and is_glm4_dir(dirs[REMOTE])
    chat = [{"role": "user", "content": "你好"}]
    assert plain.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"] == \
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert plain.padding_side == "left" and plain.pad_token_id == tokenizer.pad_token_id


def test_hf_checkpoint_loaded_into_glmtunes_model_and_saved_back_is_unchanged(dirs: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    ours = load_hf_as_remote(dirs[HF])
    native = load_glm4(dirs[HF])
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(ours, ids), _logits(load_glm4(dirs[REMOTE]), ids))
    save_glm4(ours, tmp_path / "again", HF)
    again = load_glm4(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), native.state_dict().values(),
                                                 strict=True))


def test_glm4_0414_is_native_only(tmp_path: Path, tokenizer) -> None:
    directory = create_glm4_model_dir(tmp_path / "0414", HF_0414, tokenizer=tokenizer)
    model = load_glm4(directory)
    assert type(model).__name__ == "Glm4ForCausalLM" and checkpoint_layout(directory) == HF_0414
    assert _logits(model, torch.tensor([[1, 2, 3]])).shape[-1] == model.config.vocab_size
    with pytest.raises(InvalidInputError, match="cannot be saved in the 'remote' layout"):
        save_glm4(model, tmp_path / "nope", REMOTE)
    with pytest.raises(InvalidInputError, match="no remote-code layout"):
        load_hf_as_remote(directory)


def test_native_hf_model_takes_glmtunes_int8_quantization_and_lora(dirs: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model

    from glmtune.modeling.hf_compat import peft_reads_deprecated_checkpointing
    from glmtune.modeling.quantization import QuantizedLinear, quantize_model

    assert QUANTIZED_MODULES[REMOTE] == V2_QUANTIZED
    model = load_glm4(dirs[HF])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    full = _logits(model, ids)
    assert quantize_model(model.model, 8, QUANTIZED_MODULES[HF]) == 6 * model.config.num_hidden_layers
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, QuantizedLinear)
    assert ((_logits(model, ids) - full).abs().max() / full.abs().max()).item() < 0.05
    with peft_reads_deprecated_checkpointing():
        lora = get_peft_model(load_glm4(dirs[HF]), LoraConfig(r=4, target_modules=list(LORA_TARGETS[HF])))
    assert lora.get_nb_trainable_parameters()[0] > 0 and _logits(lora, ids).shape == full.shape
