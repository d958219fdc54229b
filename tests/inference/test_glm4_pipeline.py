"""GLM-4 through `glmtune run`, in both published layouts: a tiny model created, trained (LoRA, and in full until
it has memorised the example dialogues), exported in the layout it came in and served over the OpenAI API with
the answers the trained model gives."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
import yaml
from testkit import REPO_ROOT

from glmtune.spec import load_spec_file, spec_from_mapping
from glmtune.templates import decode_answer, encode_prompt, stop_token_ids

QUICKSTART = REPO_ROOT / "examples" / "glm4-quickstart.yaml"
QUESTIONS = ("你好", "What is LoRA?")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _lora_spec(layout: str, data: Path) -> dict:
    return {
        "apiVersion": "glmtune.io/v1alpha1", "kind": "GLMFineTune", "metadata": {"name": f"glm4-{layout}"},
        "spec": {
            "model": {"family": "glm4", "create": {"size": "tiny", "seed": 0, "layout": layout}},
            "data": {"sources": [str(data)], "maxLength": 128},
            "method": {"name": "lora", "lora": {"r": 8, "dropout": 0.0,
                                                "targetModules": ["query_key_value", "dense_h_to_4h"]}},
            "training": {"maxSteps": 6, "batchSize": 2, "learningRate": 1e-2, "logEverySteps": 2,
                         "evaluation": {"everyEpoch": False}},
            "output": {"uri": "export", "export": "merged"},
        },
    }


def _greedy(model, tokenizer, question: str, max_new_tokens: int = 64) -> list[int]:
    ids = torch.tensor([encode_prompt(tokenizer, "glm4", question).ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer, "glm4"),
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _served_answers(export: Path, served, server_factory) -> dict[str, str]:
    with server_factory(served(export, name="glm4"), max_tokens_limit=64) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0, timeout=60)
        return {q: client.chat.completions.create(model="glm4", messages=[{"role": "user", "content": q}],
                                                  temperature=0, max_tokens=64).choices[0].message.content
                for q in QUESTIONS}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> dict[str, Path]:
    """The LoRA run of each layout (same seed, same data), by layout."""
    from glmtune_app.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("glm4-lora")
    data = REPO_ROOT / "examples" / "data" / "quickstart.jsonl"
    runs = {}
    for layout in ("remote", "hf"):
        result = run_pipeline(spec_from_mapping(_lora_spec(layout, data)), root / layout)
        assert result.export_kind == "merged" and result.steps == 6
        runs[layout] = Path(result.export_uri)
    return runs


@pytest.mark.slow
def test_lora_exports_go_out_in_the_layout_the_base_came_in(lora_runs) -> None:
    remote = json.loads((lora_runs["remote"] / "config.json").read_text())
    hf = json.loads((lora_runs["hf"] / "config.json").read_text())
    assert remote["architectures"] == ["ChatGLMForConditionalGeneration"] and remote["model_type"] == "chatglm"
    assert hf["architectures"] == ["GlmForCausalLM"] and hf["model_type"] == "glm"
    tokenizer_config = json.loads((lora_runs["hf"] / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tokenizer_config["family"] == "glm4"


@pytest.mark.slow
def test_both_layouts_train_the_same_model_and_serve_its_greedy_answers(lora_runs, served, server_factory) -> None:
    """The -hf run trains on an exact remote-code copy: the same weights after training, so the same answers; the
    -hf export in transformers' own GlmForCausalLM (no glmtune code) gives the tokens the server sends."""
    from transformers import AutoModelForCausalLM

    from glmtune.tokenization import load_tokenizer

    answers = {layout: _served_answers(export, served, server_factory) for layout, export in lora_runs.items()}
    assert answers["remote"] == answers["hf"]
    native = AutoModelForCausalLM.from_pretrained(str(lora_runs["hf"]), dtype=torch.float32).eval()
    assert type(native).__name__ == "GlmForCausalLM"
    tokenizer = load_tokenizer(lora_runs["hf"])
    for question in QUESTIONS:
        expected = decode_answer(tokenizer, "glm4", _greedy(native, tokenizer, question))
        assert answers["hf"][question].strip() == expected  # decode_answer strips as chat() does, the API keeps it


@pytest.mark.slow
def test_the_glm4_quickstart_serves_the_trained_answers(tmp_path: Path, served, server_factory) -> None:
    """examples/glm4-quickstart.yaml (full fine-tuning of a tiny -hf GLM-4, fewer epochs): asked a training
    question, the served model answers exactly the trained answer."""
    from glmtune_app.pipeline import run_pipeline

    spec = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    spec["spec"]["data"]["sources"] = [str(REPO_ROOT / "examples" / "data" / "quickstart.jsonl")]
    spec["spec"]["training"]["epochs"] = 30
    result = run_pipeline(spec_from_mapping(spec), tmp_path / "run")
    assert json.loads((Path(result.export_uri) / "config.json").read_text())["model_type"] == "glm"
    trained = {}
    for line in (REPO_ROOT / "examples" / "data" / "quickstart.jsonl").read_text(encoding="utf-8").splitlines():
        paragraph = json.loads(line)["paragraph"]
        if len(paragraph) == 1:
            trained[paragraph[0]["q"]] = paragraph[0]["a"]
    answers = _served_answers(Path(result.export_uri), served, server_factory)
    assert answers == {q: trained[q] for q in QUESTIONS}


def test_the_glm4_quickstart_is_a_valid_spec() -> None:
    spec = load_spec_file(QUICKSTART)
    assert spec.spec.model.family == "glm4" and spec.spec.model.create.layout == "hf"


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A tiny -hf (GlmForCausalLM) GLM-4 checkpoint on disk, given to runs as model.uri."""
    from glmtune.modeling import create_model_dir

    return create_model_dir("glm4", "tiny", tmp_path_factory.mktemp("glm4-hf") / "base", layout="hf")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "quantization", "kind"), [
    ({"name": "ptv2", "ptv2": {"preSeqLen": 4}}, {"bits": 4}, "prefix"),
    ({"name": "adalora", "adalora": {"targetR": 4, "initR": 8}}, None, "adapter"),
    ({"name": "lora"}, {"bits": 8}, "adapter"),
    ({"name": "freeze", "freeze": {"trainLastLayers": 1}}, None, "full"),
])
def test_every_method_over_an_hf_base_trains_exports_and_serves(hf_base: Path, tmp_path: Path, served, method: dict,
                                                                quantization: dict | None, kind: str) -> None:
    """p-tuning v2 over int4, AdaLoRA, LoRA over int8 and freeze on an -hf base given by path: adapter and prefix
    exports name the -hf base, which serving loads (converted in memory) under them."""
    from glmtune_app.pipeline import run_pipeline

    from glmtune.export_format import read_export_info

    spec = _lora_spec("hf", REPO_ROOT / "examples" / "data" / "quickstart.jsonl")
    spec["spec"]["model"] = {"uri": str(hf_base), "family": "glm4",
                             **({"quantization": quantization} if quantization else {})}
    spec["spec"]["method"] = method
    spec["spec"]["training"]["maxSteps"] = 2
    spec["spec"]["output"]["export"] = "adapter" if kind in ("adapter", "prefix") else "merged"
    result = run_pipeline(spec_from_mapping(spec), tmp_path / "run")
    export = Path(result.export_uri)
    info = read_export_info(export)
    assert (info.kind, info.family, info.template) == (kind, "glm4", "glm4")
    if kind != "full":
        assert Path(info.base_model) == hf_base.resolve()
    model = served(export, name="m")["m"]
    assert model.template == "glm4" and model.tokenizer.family == "glm4"
    ids = torch.tensor([model.encode("你好")])
    with torch.no_grad():
        logits = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.isfinite(logits).all()
