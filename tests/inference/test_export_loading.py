"""Every export kind through the public `glmtune.load_model` and through serving, at the precision the export
was trained over (or the one asked for), with its base found wherever the export says it is."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from glmtune_inference.chat import ChatModel
from glmtune_inference.cli import quantize_bits
from glmtune_inference.loading import load_served_models

from glmtune.errors import InvalidInputError
from glmtune.modeling.quantization import QuantizedLinear


def greedy(served_model, query: str) -> str:
    return ChatModel(served_model).chat(query, do_sample=False, max_new_tokens=24)[0]


def only(models: dict):
    assert len(models) == 1
    return next(iter(models.values()))


def block_linear_bits(model: torch.nn.Module) -> set[int]:
    """The bits of every quantized block Linear (empty: the blocks run in full precision)."""
    return {m.bits for m in model.modules() if isinstance(m, QuantizedLinear)}


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize(("kind", "bits"), [("prefix_int4", 4), ("adapter_int8", 8)])
def test_a_delta_export_is_served_over_the_base_precision_it_was_trained_on(exports, served, kind, bits):
    model = only(served(exports.get(kind, "v2")))
    assert block_linear_bits(model.model) == {bits}
    for query, answer in exports.reference[(kind, "v2")].items():
        assert greedy(model, query) == answer


def test_quantize_override_wins_over_the_recorded_precision(exports, served):
    export = exports.get("prefix_int4", "v2")
    assert block_linear_bits(only(served(export, quantization_bit=0)).model) == set()
    assert block_linear_bits(only(served(export, quantization_bit=8)).model) == {8}


def test_adapters_trained_over_different_precisions_cannot_share_a_base_silently(exports, served):
    adapters = {"ptv2": str(exports.get("prefix_int4", "v2")), "lora": str(exports.get("adapter", "v2"))}
    with pytest.raises(InvalidInputError, match="--quantize"):
        load_served_models(str(exports.get("base", "v2")), adapters)
    models = served(exports.get("base", "v2"), adapters, quantization_bit=4)
    assert all(block_linear_bits(m.model) == {4} for m in models.values())


def test_quantize_flag_takes_4_8_or_none():
    assert [quantize_bits(v) for v in ("4", "8", "none", "0", "None")] == [4, 8, 0, 0, 0]
    with pytest.raises(Exception, match="expected 4, 8 or none"):
        quantize_bits("16")


@pytest.mark.parametrize("kind", ["prefix", "prefix_int4"])
def test_public_load_model_assembles_a_prefix_export(exports, kind):
    from glmtune_inference.loading import ServedModel

    import glmtune
    from glmtune.tokenization import load_tokenizer

    export = exports.get(kind, "v2")
    model = glmtune.load_model(export)
    assert model.config.pre_seq_len == 4
    assert block_linear_bits(model) == ({4} if kind == "prefix_int4" else set())
    served = ServedModel("m", model, load_tokenizer(export), "v2", "v2", context_length=128, prefix_len=4)
    for query, answer in exports.reference[(kind, "v2")].items():
        assert greedy(served, query) == answer


def test_public_load_model_gives_an_adapter_export_merged_or_not(exports):
    from peft import PeftModel

    import glmtune
    from glmtune.modeling import ChatGLM2ForConditionalGeneration

    export = exports.get("adapter", "v2")
    with_adapter = glmtune.load_model(export)
    merged = glmtune.load_model(export, merge_adapter=True)
    assert isinstance(with_adapter, PeftModel) and type(merged) is ChatGLM2ForConditionalGeneration
    ids = [5, 6, 7, 8, 9]
    torch.testing.assert_close(logits(merged, ids), logits(with_adapter, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(merged, ids), logits(glmtune.load_model(exports.get("base", "v2")), ids))


def test_an_adapter_is_not_merged_into_a_quantized_base(exports):
    import glmtune

    with pytest.raises(InvalidInputError, match="cannot be merged into an int8/int4 base"):
        glmtune.load_model(exports.get("adapter_int8", "v2"), merge_adapter=True)
    merged = glmtune.load_model(exports.get("adapter_int8", "v2"), quantization_bit=0, merge_adapter=True)
    assert block_linear_bits(merged) == set()


def test_a_bundled_base_is_found_inside_the_export_wherever_it_was_moved(exports, bundle_base, tmp_path,
                                                                       trained_qa):
    import glmtune

    bundled = bundle_base(exports.get("prefix", "v2"), exports.get("base", "v2"), tmp_path / "a" / "ptv2")
    moved = shutil.move(bundled, tmp_path / "elsewhere")
    query, answer = trained_qa["prefix"][0]
    assert greedy(only(load_served_models(str(moved))), query) == answer
    assert glmtune.load_model(moved).config.pre_seq_len == 4


@pytest.mark.parametrize("recorded", ["../base", "missing"])
def test_a_relative_base_outside_or_absent_from_the_export_is_refused(exports, tmp_path, recorded):
    copy = shutil.copytree(exports.get("adapter", "v2"), tmp_path / "adapter")
    (copy / "glmtune-manifest.json").unlink()
    info = json.loads((copy / "glmtune-export.json").read_text())
    (copy / "glmtune-export.json").write_text(json.dumps({**info, "base_model": recorded}))
    with pytest.raises(InvalidInputError, match="base") as err:
        load_served_models(str(copy))
    assert "glmtune-export.json:base_model" in str(err.value)


@pytest.mark.slow
def test_glmtune_serve_serves_the_training_report_shipped_in_the_export(exports, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from glmtune import storage

    export = shutil.copytree(exports.get("full", "v2"), tmp_path / "export")
    (export / "report.html").write_text("<html><body>loss went down</body></html>", encoding="utf-8")
    storage.write_manifest(export)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GLMTUNE_API_KEY": ""}
    entry = "import sys; from glmtune_app.cli import main; sys.exit(main(sys.argv[1:]))"
    server = subprocess.Popen([sys.executable, "-c", entry, "serve", str(export), "--device", "cpu", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/report", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        assert reply.status_code == 200 and "loss went down" in reply.text
    finally:
        server.terminate()
        server.wait(timeout=60)
