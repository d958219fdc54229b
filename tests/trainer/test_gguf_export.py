"""GGUF export for llama.cpp: names/metadata/vocabulary, merged LoRA, v1 refusal, and llama.cpp itself decoding
the file to the same greedy tokens as glmtune (llama-cpp-python from scripts/get_llamacpp.sh, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from glmtune_trainer.cli import register
from glmtune_trainer.gguf_export import export_gguf
from testkit import REPO_ROOT, require_shared

from glmtune.errors import InvalidInputError

LLAMACPP_PYTHON = Path(os.environ.get("GLMTUNE_LLAMACPP_PYTHON", REPO_ROOT / ".venv-llamacpp" / "bin" / "python"))
PROMPTS = ["你好，请介绍一下你自己。", "The quick brown fox jumps over", "def fibonacci(n):\n    return", "北京是"]

# Runs under the llama-cpp-python venv: greedy decoding from given ids, no stopping at eos (fixed length).
_LLAMACPP_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=256, n_threads=1, n_batch=256, logits_all=True, verbose=False)
result = {"tokens": [], "first_logits": [],
          "tokenized": [llm.tokenize(t.encode(), add_bos=False, special=False) for t in job["texts"]]}
for prompt in job["prompts"]:
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[llm.n_tokens - 1])
    result["first_logits"].append(logits.tolist())
    out = []
    for _ in range(job["steps"]):
        nxt = int(np.argmax(logits))
        out.append(nxt)
        llm.eval([nxt])
        logits = np.array(llm.scores[llm.n_tokens - 1])
    result["tokens"].append(out)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def real_vocab_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ChatGLM2 model over the published ChatGLM2 tokenizer (64794 ids, 65024 embedding rows)."""
    from glmtune.modeling import create_model_dir

    tokenizer = require_shared("reference", "vectors", "tokenizers", "chatglm2")
    torch.set_num_threads(1)
    return create_model_dir("v2", "tiny", tmp_path_factory.mktemp("gguf") / "m", seed=3, tokenizer=tokenizer)


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key: str):
    return reader.fields[key].contents()


def test_gguf_holds_chatglm_names_metadata_vocabulary_and_exact_f32_weights(real_vocab_v2: Path,
                                                                          tmp_path: Path) -> None:
    from safetensors import safe_open

    from glmtune.tokenization import load_tokenizer

    result = export_gguf(real_vocab_v2, tmp_path / "m.gguf", "f32")
    reader = _reader(result.path)
    config = json.loads((real_vocab_v2 / "config.json").read_text())
    assert _field(reader, "general.architecture") == "chatglm"
    assert _field(reader, "chatglm.block_count") == config["num_layers"]
    assert _field(reader, "chatglm.attention.head_count_kv") == config["multi_query_group_num"]
    assert _field(reader, "chatglm.rope.dimension_count") == config["kv_channels"] // 2
    assert _field(reader, "chatglm.feed_forward_length") == config["ffn_hidden_size"]
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    tokenizer = load_tokenizer(real_vocab_v2)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["padded_vocab_size"] == 65024
    assert tokens[:64789] == [tokenizer.sp_model.id_to_piece(i) for i in range(64789)]
    assert tokens[tokenizer.get_command("[gMASK]")] == "[gMASK]" and tokens[tokenizer.get_command("sop")] == "sop"
    assert tokens[-1] == "[PAD65023]"
    stored = {t.name: t for t in reader.tensors}
    layer = "transformer.encoder.layers.1."
    pairs = {"token_embd.weight": "transformer.embedding.word_embeddings.weight",
             "output.weight": "transformer.output_layer.weight",
             "output_norm.weight": "transformer.encoder.final_layernorm.weight",
             "blk.1.attn_qkv.weight": layer + "self_attention.query_key_value.weight",
             "blk.1.attn_qkv.bias": layer + "self_attention.query_key_value.bias",
             "blk.1.attn_output.weight": layer + "self_attention.dense.weight",
             "blk.1.ffn_up.weight": layer + "mlp.dense_h_to_4h.weight",
             "blk.1.ffn_down.weight": layer + "mlp.dense_4h_to_h.weight",
             "blk.1.attn_norm.weight": layer + "input_layernorm.weight",
             "blk.1.ffn_norm.weight": layer + "post_attention_layernorm.weight"}
    assert len(stored) == 3 + 7 * config["num_layers"]
    with safe_open(str(real_vocab_v2 / "model.safetensors"), "np") as source:
        for name, key in pairs.items():
            np.testing.assert_array_equal(np.asarray(stored[name].data), source.get_tensor(key), err_msg=name)


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_quantized_tensors_are_gguf_blocks_of_the_source_weights(real_vocab_v2: Path, tmp_path: Path,
                                                                 gguf_type: str) -> None:
    import gguf
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = _reader(export_gguf(real_vocab_v2, tmp_path / "q.gguf", gguf_type).path)
    stored = {t.name: t for t in reader.tensors}
    qkv = stored["blk.0.attn_qkv.weight"]
    assert qkv.tensor_type == gguf.GGMLQuantizationType[gguf_type.upper()]
    with safe_open(str(real_vocab_v2 / "model.safetensors"), "np") as source:
        want = source.get_tensor("transformer.encoder.layers.0.self_attention.query_key_value.weight")
    got = dequantize(np.asarray(qkv.data), qkv.tensor_type).reshape(want.shape)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < (0.01 if gguf_type == "q8_0" else 0.15)
    # 208-wide rows do not split into 32-value blocks: that tensor falls back to f16 rather than failing
    assert stored["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert _field(reader, "general.file_type") == {"q8_0": 7, "q4_0": 2}[gguf_type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_q8_0_quantizer_is_bit_identical_to_the_gguf_reference(dtype: torch.dtype) -> None:
    """The fast q8_0 path writes exactly what ggml's reference (gguf's numpy port) writes, rounding ties away
    from zero and all-zero blocks included."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from glmtune_trainer.gguf_quants import quantize_q8_0

    generator = torch.Generator().manual_seed(12)
    edge = torch.randn(6, 64, generator=generator)
    edge[0] = 0.0  # d == 0: scale 0, all quants 0
    edge[1, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])  # d == 1: every value a tie
    edge[2, :32] = torch.tensor([127.0, 0.49999997, -0.49999997, 1.4999999, -2.5000002] + [-0.5] * 27)
    edge[3] *= 1e-3
    edge[4] *= 1e3
    for value in ((torch.randn(301, 4096, generator=generator) * 0.02).to(dtype),
                  (torch.randn(3, 13696, generator=generator) * 5).to(dtype), edge.to(dtype)):
        want = quantize(value.to(torch.float32).numpy(), GGMLQuantizationType.Q8_0)
        got = quantize_q8_0(value)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_v1_is_refused_at_once_with_the_reason(tmp_path: Path) -> None:
    # Only run.json exists: the refusal comes before any weight is read or any model merged.
    checkpoint = tmp_path / "step-3"
    checkpoint.mkdir()
    (checkpoint / "run.json").write_text(json.dumps({"family": "v1", "method": {"name": "lora"}}))
    with pytest.raises(InvalidInputError, match="ChatGLM-6B.*no llama.cpp architecture") as caught:
        export_gguf(checkpoint, tmp_path / "out.gguf")
    assert "run.json" in str(caught.value)
    assert not list(tmp_path.glob("*.gguf*"))


def test_v1_model_folder_is_refused(tiny_model, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no llama.cpp architecture"):
        export_gguf(tiny_model("v1"), tmp_path / "out.gguf", "q8_0")


@pytest.mark.slow
def test_a_lora_checkpoint_and_its_adapter_export_give_the_merged_weights(make_spec, tiny_model,
                                                                         tmp_path: Path) -> None:
    from glmtune_trainer.export import export
    from glmtune_trainer.run import train_spec
    from safetensors import safe_open

    spec = make_spec("lora", family="v2", method_settings={"r": 4, "dropout": 0.0}, maxSteps=2,
                     learningRate=5e-2, output={"export": "adapter"})
    checkpoint = train_spec(spec, tmp_path / "run").checkpoint_dir
    merged = Path(export(checkpoint, str(tmp_path / "merged"), "merged").uri)
    adapter = Path(export(checkpoint, str(tmp_path / "adapter"), "adapter").uri)
    key = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    with safe_open(str(merged / "model.safetensors"), "np") as handle:
        want = handle.get_tensor(key)
    for source in (checkpoint, adapter):
        reader = _reader(export_gguf(source, tmp_path / f"{source.name}.gguf", "f32").path)
        got = next(np.asarray(t.data) for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(source))
    base = np.asarray(next(t.data for t in _reader(export_gguf(tiny_model("v2"), tmp_path / "b.gguf", "f32").path)
                           .tensors if t.name == "blk.0.attn_qkv.weight"))
    assert not np.allclose(base, want)  # the LoRA update really is in there


def test_cli_gguf_flags(real_vocab_v2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(["export", *map(str, argv)])
        return args.func(args)

    out = tmp_path / "dir"
    out.mkdir()
    assert run(real_vocab_v2, out, "--format", "gguf", "--gguf-type", "q8_0") == 0
    assert (out / "model-q8_0.gguf").is_file() and "gguf q8_0" in capsys.readouterr().out
    with pytest.raises(InvalidInputError, match="--format gguf only"):
        run(real_vocab_v2, tmp_path / "x", "--gguf-type", "q4_0")
    with pytest.raises(InvalidInputError, match="--adapter-only/--bits"):
        run(real_vocab_v2, tmp_path / "x.gguf", "--format", "gguf", "--bits", "4")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.gguf").exists()


def test_a_failed_export_leaves_the_previous_file_and_no_partial(real_vocab_v2: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")
    real_write = gguf.GGUFWriter.write_tensor_data
    calls = []

    def disk_full_after_three(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_write(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full_after_three)
    with pytest.raises(OSError, match="No space"):
        export_gguf(real_vocab_v2, target, "q8_0")
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _glmtune_greedy(model_dir: Path, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list]:
    from glmtune.modeling import load_model

    model = load_model(model_dir, dtype="float32").eval()
    tokens, first = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids, out = list(prompt), []
            for step in range(steps):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                if step == 0:
                    first.append(logits)
                out.append(int(logits.argmax()))
                ids.append(out[-1])
            tokens.append(out)
    return tokens, first


def test_llamacpp_decodes_the_f32_gguf_to_glmtunes_greedy_tokens(real_vocab_v2: Path, tmp_path: Path) -> None:
    if not LLAMACPP_PYTHON.is_file():
        pytest.skip(f"llama-cpp-python is not built ({LLAMACPP_PYTHON} absent): run scripts/get_llamacpp.sh")
    from glmtune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(real_vocab_v2)
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    prompts = [prefix + tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    path = export_gguf(real_vocab_v2, tmp_path / "m.gguf", "f32").path
    job = {"model": str(path), "prompts": prompts, "steps": 16, "texts": PROMPTS}
    done = subprocess.run([str(LLAMACPP_PYTHON), "-c", _LLAMACPP_CHILD], input=json.dumps(job), text=True,
                          capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    llama = json.loads(done.stdout.strip().splitlines()[-1])
    tokens, first = _glmtune_greedy(real_vocab_v2, prompts, 16)
    for got, want in zip(llama["first_logits"], first, strict=True):
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-3, atol=1e-3)
    assert llama["tokens"] == tokens
    # the vocabulary inside the file tokenizes text as glmtune's tokenizer does
    assert llama["tokenized"] == [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


# Runs under the llama-cpp-python venv: llama.cpp's own quantizer (ggml's reference code) from an f32 GGUF.
_LLAMACPP_QUANTIZE = r"""
import sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.pure, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, 1
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def test_q8_0_tensors_are_the_bytes_llamacpps_own_quantizer_writes(real_vocab_v2: Path, tmp_path: Path) -> None:
    import gguf

    if not LLAMACPP_PYTHON.is_file():
        pytest.skip(f"llama-cpp-python is not built ({LLAMACPP_PYTHON} absent): run scripts/get_llamacpp.sh")
    f32 = export_gguf(real_vocab_v2, tmp_path / "f32.gguf", "f32").path
    done = subprocess.run([str(LLAMACPP_PYTHON), "-c", _LLAMACPP_QUANTIZE, str(f32), str(tmp_path / "llama.gguf")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = {t.name: t for t in _reader(tmp_path / "llama.gguf").tensors}
    ours = {t.name: t for t in _reader(export_gguf(real_vocab_v2, tmp_path / "q8.gguf", "q8_0").path).tensors}
    q8 = gguf.GGMLQuantizationType.Q8_0
    both = [name for name, t in ours.items() if t.tensor_type == q8 and theirs[name].tensor_type == q8]
    assert {"token_embd.weight", "output.weight", "blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(both)
    for name in both:
        np.testing.assert_array_equal(np.asarray(ours[name].data), np.asarray(theirs[name].data), err_msg=name)


def test_v3_gguf_carries_chatglm3_chat_template_and_stops_at_the_user_turn(tiny_model, tmp_path: Path) -> None:
    from glmtune.tokenization import load_tokenizer

    model_dir = tiny_model("v3")
    reader = _reader(export_gguf(model_dir, tmp_path / "v3.gguf", "f16").path)
    tokenizer = load_tokenizer(model_dir)
    # llama.cpp picks its built-in chatglm3 format from "[gMASK]sop" in the template
    assert "[gMASK]sop" in _field(reader, "tokenizer.chat_template")
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.get_command("<|user|>")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[tokenizer.get_command("<|assistant|>")] == "<|assistant|>"
    assert _field(reader, "glmtune.family") == "v3"


def test_sharded_bin_checkpoints_give_the_same_file_as_safetensors(real_vocab_v2: Path, tmp_path: Path) -> None:
    """THUDM publishes pytorch_model-0000N-of-0000M.bin shards + index: read lazily, same GGUF bytes."""
    import shutil

    from safetensors.torch import load_file

    published = tmp_path / "published"
    published.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(real_vocab_v2 / name, published / name)
    state = load_file(str(real_vocab_v2 / "model.safetensors"))
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, published / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (published / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    from_bin = _reader(export_gguf(published, tmp_path / "bin.gguf", "f16").path)
    from_safetensors = _reader(export_gguf(real_vocab_v2, tmp_path / "st.gguf", "f16").path)
    assert [t.name for t in from_bin.tensors] == [t.name for t in from_safetensors.tensors]
    for ours, theirs in zip(from_bin.tensors, from_safetensors.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type
        np.testing.assert_array_equal(np.asarray(ours.data), np.asarray(theirs.data), err_msg=ours.name)
