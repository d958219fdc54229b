"""GLM-4 where a user reaches it: family detection, tokenizer loading in both layouts, `glmtune model init`, the
spec's create.layout, and the layouts glmtune cannot train or serve refused with a message naming the file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO_ROOT

from glmtune.errors import InvalidInputError
from glmtune.modeling import create_model_dir
from glmtune.modeling.families import family
from glmtune.modeling.glm4 import GLM4_9B_CHAT
from glmtune.modeling.glm4_checkpoint import (
    SOURCE_LAYOUT_FILE,
    checkpoint_layout,
    convert_to_remote,
    create_glm4_model_dir,
    source_layout,
)
from glmtune.spec import spec_from_mapping
from glmtune.spec.loading import SpecError
from glmtune.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm4-wiring")
    return {layout: create_model_dir("glm4", "tiny", root / layout, layout=layout) for layout in ("remote", "hf")}


def test_both_layouts_and_published_configs_are_detected_as_glm4(dirs) -> None:
    assert family(dirs["remote"]) == family(dirs["hf"]) == "glm4"
    assert family({**GLM4_9B_CHAT, "model_type": "chatglm"}) == "glm4"  # no "family" key: the 151552-row vocabulary
    assert family({"model_type": "glm", "vocab_size": 151552}) == "glm4"
    assert family({"padded_vocab_size": 65024, "multi_query_attention": True}) == "v2"  # ChatGLM2 stays ChatGLM2


def test_an_hf_tokenizer_with_only_tokenizer_json_loads_with_the_same_ids(dirs, tmp_path: Path) -> None:
    only_json = tmp_path / "hf-tokenizer"
    only_json.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dirs["hf"] / name, only_json / name)
    from_json, from_ranks = load_tokenizer(only_json), load_tokenizer(dirs["hf"])
    text = "从南京到上海的路线 <|user|> hello"
    assert from_json.ranks == from_ranks.ranks
    assert from_json.encode(text) == from_ranks.encode(text)
    assert from_json.get_command("<|assistant|>") == from_ranks.get_command("<|assistant|>")


def test_an_hf_checkpoint_converts_to_remote_code_and_remembers_its_layout(dirs, tmp_path: Path) -> None:
    import torch

    from glmtune.modeling import load_model
    from glmtune.modeling.glm4_checkpoint import load_glm4

    copy = convert_to_remote(dirs["hf"], tmp_path / "remote-copy")
    assert checkpoint_layout(copy) == "remote" and source_layout(copy) == "hf" and source_layout(dirs["hf"]) == "hf"
    assert family(copy) == "glm4"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        native = load_glm4(dirs["hf"], torch.float32)(input_ids=ids).logits
        ours = load_model(copy, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(ours, native, rtol=1e-5, atol=1e-5)
    (copy / SOURCE_LAYOUT_FILE).write_text('{"layout": "gguf"}')
    with pytest.raises(InvalidInputError, match=f"{SOURCE_LAYOUT_FILE}:layout"):
        source_layout(copy)


def test_glm4_0414_is_refused_for_training_and_serving_naming_its_config(tmp_path: Path) -> None:
    from glmtune.export_loading import load_base

    base = create_glm4_model_dir(tmp_path / "0414", "hf-0414")
    assert family(base) == "glm4"
    with pytest.raises(InvalidInputError, match=r"0414.*no remote-code twin") as caught:
        convert_to_remote(base, tmp_path / "copy")
    assert caught.value.where == str(base / "config.json")
    with pytest.raises(InvalidInputError, match="no remote-code twin"):
        load_base(base, None, "cpu", None)


def test_a_training_run_over_0414_stops_at_the_model_stage_naming_the_spec_field(tmp_path: Path) -> None:
    from glmtune_trainer.model_setup import prepare_base_model

    base = create_glm4_model_dir(tmp_path / "0414", "hf-0414")
    spec = spec_from_mapping({
        "apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "metadata": {"name": "g"},
        "spec": {"model": {"uri": str(base), "family": "glm4"}, "data": {"sources": ["x.jsonl"]},
                 "method": {"name": "lora"}, "output": {"uri": "out"}}})
    with pytest.raises(InvalidInputError, match="no remote-code twin") as caught:
        prepare_base_model(spec, tmp_path / "work")
    assert caught.value.where == "spec.model.uri"


def test_create_layout_hf_needs_family_glm4() -> None:
    spec = {"apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "metadata": {"name": "g"},
            "spec": {"model": {"family": "v2", "create": {"layout": "hf"}}, "data": {"sources": ["x.jsonl"]},
                     "method": {"name": "lora"}, "output": {"uri": "out"}}}
    with pytest.raises(SpecError, match=r"spec\.model\.create\.layout.*needs family glm4"):
        spec_from_mapping(spec)
    spec["spec"]["model"]["family"] = "glm4"
    assert spec_from_mapping(spec).spec.model.create.layout == "hf"
    with pytest.raises(InvalidInputError, match="only GLM-4"):
        create_model_dir("v2", "tiny", "/nonexistent/never-written", layout="hf")


def test_model_init_writes_an_hf_glm4(tmp_path: Path) -> None:
    out = tmp_path / "g"
    done = subprocess.run([sys.executable, "-m", "glmtune_app.cli", "model", "init", "--family", "glm4",
                           "--layout", "hf", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert checkpoint_layout(out) == "hf" and family(out) == "glm4"


def test_an_hf_checkpoint_serves_quantized_in_glmtunes_model(dirs) -> None:
    """`glmtune serve --quantize 8` on an -hf GLM-4: converted to glmtune's model, then int8 weight-only."""
    import torch

    from glmtune.export_loading import is_quantized, load_base

    full, int8 = load_base(dirs["hf"], "float32", "cpu", None), load_base(dirs["hf"], "float32", "cpu", 8)
    assert not is_quantized(full) and is_quantized(int8)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(int8(input_ids=ids).logits, full(input_ids=ids).logits, rtol=0.05, atol=0.05)
    with pytest.raises(InvalidInputError, match="bitsandbytes layers load GLM-4 in the remote-code layout only"):
        load_base(dirs["hf"], "float32", "cpu", 4, backend="bitsandbytes")
