"""The tiny-model factory, `glmtune model init`, the package's public names and Auto-class registration."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from glmtune_app.cli import main
from testkit import REPO_ROOT

from glmtune.modeling.tiny import create_model_dir, tiny_config


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_model_init_writes_a_directory_that_loads_and_generates(tmp_path, capsys, family: str) -> None:
    from glmtune.modeling import load_model
    from glmtune.templates import encode_prompt, template_for_family
    from glmtune.tokenization import load_tokenizer

    out = tmp_path / family
    assert main(["model", "init", "--family", family, "--size", "tiny", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model, tokenizer = load_model(out), load_tokenizer(out)
    assert tokenizer.family == family
    assert model.config.num_layers == 2 and model.config.hidden_size == 64
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    prompt = encode_prompt(tokenizer, template_for_family(family), "你好").ids
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=3)
    assert generated.shape == (1, len(prompt) + 3)
    assert isinstance(tokenizer.decode(generated[0, len(prompt):].tolist()), str)


def test_model_init_refuses_a_non_empty_directory(tmp_path, capsys) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["model", "init", "--family", "v2", str(tmp_path)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# Published tokenizer → (rows of the published embedding, special ids in the published config.json).
PUBLISHED = {
    "v1": ("chatglm6b", 130528, {"bos_token_id": 130004, "eos_token_id": 130005, "pad_token_id": 3,
                                 "mask_token_id": 130000, "gmask_token_id": 130001}),
    "v2": ("chatglm2", 65024, {"eos_token_id": 2, "pad_token_id": 0}),
}


@pytest.mark.parametrize("family", sorted(PUBLISHED))
def test_model_init_with_a_published_tokenizer_has_the_real_vocabulary(shared, tmp_path, capsys,
                                                                       family: str) -> None:
    from glmtune.modeling import load_model
    from glmtune.templates import encode_prompt, template_for_family
    from glmtune.tokenization import load_tokenizer

    folder, rows, ids = PUBLISHED[family]
    given = shared / "reference" / "vectors" / "tokenizers" / folder
    out = tmp_path / "m"
    assert main(["model", "init", "--family", family, "--tokenizer", str(given), str(out)]) == 0
    model, tokenizer, real = load_model(out), load_tokenizer(out), load_tokenizer(given)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert {key: getattr(model.config, key) for key in ids} == ids
    assert model.config.num_layers == 2 and model.config.hidden_size == 64  # --size tiny still decides
    text = "你好，请用一句话介绍 ChatGLM。"
    assert tokenizer.encode(text) == real.encode(text) and len(tokenizer) == len(real)
    prompt = encode_prompt(tokenizer, template_for_family(family), text).ids
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=2)
    assert generated.shape == (1, len(prompt) + 2)


def test_small_size_with_a_published_tokenizer_keeps_its_transformer(shared) -> None:
    from glmtune.tokenization import load_tokenizer

    real = load_tokenizer(shared / "reference" / "vectors" / "tokenizers" / "chatglm6b")
    small = tiny_config("v1", "small", real)
    assert (small.num_layers, small.hidden_size, small.num_attention_heads, small.vocab_size) == (4, 512, 8, 130528)


def test_model_init_refuses_a_tokenizer_of_another_family(shared, tmp_path, capsys) -> None:
    given = shared / "reference" / "vectors" / "tokenizers" / "chatglm6b"
    assert main(["model", "init", "--family", "v2", "--tokenizer", str(given), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert str(given) in err and "v1 tokenizer" in err
    assert not (tmp_path / "m").exists()


def test_create_model_dir_is_deterministic_per_seed(tmp_path) -> None:
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        path = create_model_dir("v2", "tiny", tmp_path / name, seed=seed)
        digests.append(hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_tiny_config_takes_vocabulary_and_special_ids_from_the_tokenizer(tmp_path) -> None:
    from glmtune.tokenization import load_tokenizer
    from glmtune.tokenization.tiny import train_tiny_tokenizer

    v1 = load_tokenizer(train_tiny_tokenizer("v1", tmp_path / "v1"))
    config = tiny_config("v1", "tiny", v1)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (len(v1), v1.sop_token_id,
                                                                            v1.eos_token_id)
    assert (config.gmask_token_id, config.mask_token_id, config.pad_token_id) == (
        v1.gmask_token_id, v1.mask_token_id, v1.pad_token_id)
    v3 = load_tokenizer(train_tiny_tokenizer("v3", tmp_path / "v3"))
    config = tiny_config("v3", "tiny", v3)
    assert (config.padded_vocab_size, config.eos_token_id, config.seq_length) == (len(v3), 2, 8192)


def test_sizes_and_published_ids_without_a_tokenizer() -> None:
    small = tiny_config("v2", "small")
    assert (small.num_layers, small.hidden_size, small.num_attention_heads, small.kv_channels) == (4, 512, 8, 64)
    assert small.padded_vocab_size == 65024 and small.multi_query_group_num == 2
    v1 = tiny_config("v1", "tiny")
    assert (v1.vocab_size, v1.gmask_token_id, v1.bos_token_id, v1.eos_token_id) == (130528, 130001, 130004, 130005)


def test_auto_classes_resolve_both_families() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    import glmtune.modeling as modeling

    modeling.register_auto_classes()
    for model_type, model_class in (("chatglm", modeling.ChatGLMForConditionalGeneration),
                                    ("chatglm2", modeling.ChatGLM2ForConditionalGeneration)):
        config = AutoConfig.for_model(model_type, num_layers=1, hidden_size=32, num_attention_heads=2,
                                      vocab_size=64, padded_vocab_size=64, inner_hidden_size=64, kv_channels=16,
                                      ffn_hidden_size=64)
        assert isinstance(AutoModelForCausalLM.from_config(config), model_class)


def test_public_names_resolve_and_registration_stays_torch_free() -> None:
    import glmtune
    import glmtune.modeling as modeling

    for name in modeling.__all__:
        assert getattr(modeling, name) is not None
    assert glmtune.load_model is modeling.load_model
    code = ("import argparse, sys\nimport glmtune.modeling, glmtune.modeling.cli as c\n"
            "c.register(argparse.ArgumentParser().add_subparsers())\nassert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
