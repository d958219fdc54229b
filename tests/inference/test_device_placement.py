"""Serving on a device: which device and dtype `auto` picks, that every weight, buffer and cache tensor lives on
the requested device after load, prefill and decode, and that a decode step reads the device back once.

The same tests run on `cpu` everywhere and on `cuda` where torch sees a GPU (`-m gpu` selects that half).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from glmtune_inference.batching import DecodeBatch, DecodeSequence
from glmtune_inference.generation import TextDeltaDecoder
from glmtune_inference.kv_cache import GrowingLayer

from glmtune.errors import InvalidInputError
from glmtune.export_loading import auto_dtype, bf16_supported, resolve_device

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")])]
# Tensor methods that copy a value to (or read it on) the host: on a GPU each one waits for the device.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


# --- which device and dtype ---------------------------------------------------------------------------------

def test_auto_device_is_cuda_exactly_when_torch_can_use_it() -> None:
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU ") == torch.device("cpu")


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:0:1", "mps", "", "tpu:0"])
def test_unknown_device_strings_are_input_errors_naming_the_flag(text: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        resolve_device(text, where="--device")
    assert raised.value.where == "--device" and "auto, cpu, cuda or cuda:N" in str(raised.value)


@pytest.mark.skipif(CUDA, reason="checks the error a CPU-only machine gives")
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_an_input_error(text: str) -> None:
    with pytest.raises(InvalidInputError, match="sees no CUDA device") as raised:
        resolve_device(text, where="--device")
    assert raised.value.where == "--device"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_cuda_index_beyond_the_visible_gpus_is_an_input_error() -> None:
    with pytest.raises(InvalidInputError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(("capability", "bf16"), [((6, 1), False), ((7, 0), False), ((7, 5), False),
                                                  ((8, 0), True), ((8, 6), True), ((9, 0), True), (None, False)])
def test_bf16_needs_compute_capability_8(capability: tuple[int, int] | None, bf16: bool) -> None:
    assert bf16_supported(capability) is bf16


def test_auto_dtype_is_fp32_on_cpu_and_bf16_or_fp16_on_a_gpu_by_capability() -> None:
    assert auto_dtype(torch.device("cpu")) == torch.float32
    gpu = torch.device("cuda", 0)  # with the capability given, nothing asks the (absent) driver
    assert auto_dtype(gpu, (9, 0)) == torch.bfloat16
    assert auto_dtype(gpu, (7, 5)) == torch.float16


def test_loaders_reject_a_bad_device_before_loading(exports: Any) -> None:
    from glmtune_inference.loading import LoadOptions, load_served_models

    from glmtune import load_model

    base = exports.get("base", "v2")
    with pytest.raises(InvalidInputError) as raised:
        load_served_models(str(base), options=LoadOptions(device="gpu0"))
    assert raised.value.where == "--device"
    with pytest.raises(InvalidInputError) as raised:
        load_model(base, device="tpu")
    assert raised.value.where == "device"


def test_dtype_auto_is_the_devices_dtype_and_none_keeps_the_checkpoints(exports: Any, tmp_path: Any) -> None:
    from glmtune_inference.loading import LoadOptions, load_served_models

    from glmtune import load_model
    from glmtune.modeling import save_pretrained
    from glmtune.tokenization import load_tokenizer

    base = exports.get("base", "v2")
    stored_fp16 = save_pretrained(load_model(base, dtype="float16"), tmp_path / "fp16", tokenizer=load_tokenizer(base))
    assert next(load_model(stored_fp16).parameters()).dtype == torch.float16
    want = auto_dtype(resolve_device("auto"))
    assert next(load_model(stored_fp16, dtype="auto", device="auto").parameters()).dtype == want
    (served,) = load_served_models(str(stored_fp16), options=LoadOptions(dtype="auto")).values()
    assert {p.dtype for p in served.model.parameters()} == {want}


def test_serve_and_chat_take_device_and_dtype_flags_defaulting_to_auto() -> None:
    import argparse

    from glmtune_inference.cli import register

    parser = argparse.ArgumentParser(prog="glmtune")
    register(parser.add_subparsers(dest="command"))
    for command in ("serve", "chat"):
        args = parser.parse_args([command, "m"])
        assert (args.device, args.dtype) == ("auto", "auto")
    args = parser.parse_args(["serve", "m", "--device", "cuda:1", "--dtype", "float16", "--max-kv-memory", "2GiB"])
    assert (args.device, args.dtype, args.max_kv_memory) == ("cuda:1", "float16", 2 * 2**30)


# --- placement ----------------------------------------------------------------------------------------------

KINDS = [("base", "v1"), ("base", "v2"), ("int8", "v1"), ("adapter", "v2"), ("prefix", "v1"), ("prefix_int4", "v2")]


def _tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _cache_tensors(batch: DecodeBatch) -> list[torch.Tensor]:
    tensors = [batch._mask]
    for layer in batch._cache.layers:
        tensors += [layer.keys, layer.values]
        if isinstance(layer, GrowingLayer):
            tensors += [layer._key_room, layer._value_room]
    return tensors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kind", "family"), KINDS)
def test_weights_buffers_and_caches_live_on_the_requested_device(exports: Any, served: Any, kind: str, family: str,
                                                                 device: str) -> None:
    models = served(exports.get(kind, family), name=kind, device=device)
    model = models[kind]
    want = resolve_device(device)
    misplaced = [name for name, tensor in _tensors(model.model) if tensor.device != want]
    assert misplaced == []
    batch = DecodeBatch(model.model, model.prefix_len)
    seqs = [DecodeSequence(model.encode(query), model.params(max_new_tokens=6, do_sample=sample, seed=1,
                                                      repetition_penalty=1.2), TextDeltaDecoder(model.tokenizer))
            for query, sample in (("你好", False), ("从南京到上海的路线怎么走", True))]
    batch.prefill_many(seqs)
    assert {t.device for t in _cache_tensors(batch)} == {want}
    batch.step()
    assert {t.device for t in _cache_tensors(batch)} == {want}
    assert all(seq.rng.device == want for seq in seqs if seq.rng is not None)


@pytest.mark.parametrize("device", DEVICES)
def test_several_adapters_over_one_base_share_its_tensors_on_the_device(exports: Any, served: Any,
                                                                        device: str) -> None:
    from glmtune_inference.loading import served_device

    base = exports.get("base", "v2")
    models = served(base, {"lora": exports.get("adapter", "v2"), "ptv2": exports.get("prefix", "v2")}, name="base",
                    device=device)
    assert served_device(models) == resolve_device(device)
    word = {name: dict(m.model.named_parameters()) for name, m in models.items()}
    embedding = {next(t for n, t in params.items() if n.endswith("word_embeddings.weight")).data_ptr()
                 for params in word.values()}
    assert len(embedding) == 1  # one copy of the base weights, whatever the device


# --- host reads in a decode step ----------------------------------------------------------------------------

@contextlib.contextmanager
def host_reads(model: torch.nn.Module) -> Iterator[dict[str, list[str]]]:
    """Count calls of the tensor methods that read device values on the host, split by whether the model's own
    forward made them; on CUDA also every synchronizing op torch itself reports (sync debug mode)."""
    seen: dict[str, list[str]] = {"outside": [], "model": [], "cuda_syncs": []}
    depth = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            seen["model" if depth[0] else "outside"].append(name)
            return original(self, *args, **kwargs)

        return read

    enter = model.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1))
    leave = model.register_forward_hook(lambda *_: depth.__setitem__(0, depth[0] - 1))
    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if CUDA:
                torch.cuda.set_sync_debug_mode("warn")
            yield seen
    finally:
        if CUDA:
            torch.cuda.set_sync_debug_mode("default")
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        enter.remove()
        leave.remove()
        seen["cuda_syncs"] = [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def _running_batch(model: Any, prompts: list[str]) -> DecodeBatch:
    batch = DecodeBatch(model.model, model.prefix_len)
    seqs = [DecodeSequence(model.encode(p), model.params(max_new_tokens=30, do_sample=i % 2 == 1, seed=i,
                                                   repetition_penalty=1.1 if i == 2 else 1.0),
                     TextDeltaDecoder(model.tokenizer)) for i, p in enumerate(prompts)]
    batch.prefill_many(seqs)
    batch.step()  # warm: the first step may build lazily created state
    return batch


PROMPT_SETS = {"same_length": ["你好", "你好", "你好"], "padded": ["你好", "从南京到上海的路线怎么走", "晚安"]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prompts", sorted(PROMPT_SETS))
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_decode_step_copies_only_the_chosen_ids_to_the_host(exports: Any, served: Any, family: str, prompts: str,
                                                            device: str) -> None:
    """Batching and sampling (everything of a step but the model's forward) read the device once: the ids."""
    (model,) = served(exports.get("base", family), name="base", device=device).values()
    batch = _running_batch(model, PROMPT_SETS[prompts])
    for _ in range(3):
        with host_reads(model.model) as seen:
            batch.step()
        assert seen["outside"] == ["tolist"]


# The models' forwards still branch on device values (not files of the serving code); when they stop, these
# strict xfails fail and the marks go.
V1_SYNCS = pytest.mark.xfail(
    strict=True, reason="ChatGLM-6B's forward asks bool(keep.all()) / bool(empty_rows.any()) "
    "(glmtune/modeling/chatglm6b.py, ChatGLMModel.forward) on every step: one or two more device waits")
V2_PADDED_SYNC = pytest.mark.xfail(
    strict=True, reason="ChatGLM2's forward asks bool(mask_2d.all()) (glmtune/modeling/chatglm2.py) whenever a "
    "2-D mask is given, which a padded batch needs: one more device wait")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("family", "prompts"), [("v2", "same_length"),
                                                 pytest.param("v2", "padded", marks=V2_PADDED_SYNC),
                                                 pytest.param("v1", "same_length", marks=V1_SYNCS),
                                                 pytest.param("v1", "padded", marks=V1_SYNCS)])
def test_whole_decode_step_reads_the_device_at_most_once(exports: Any, served: Any, family: str, prompts: str,
                                                         device: str) -> None:
    (model,) = served(exports.get("base", family), name="base", device=device).values()
    batch = _running_batch(model, PROMPT_SETS[prompts])
    with host_reads(model.model) as seen:
        batch.step()
    assert len(seen["outside"]) + len(seen["model"]) <= 1, seen
    if device == "cuda":
        assert len(seen["cuda_syncs"]) <= 1, seen["cuda_syncs"]


# --- what runs where ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_onednn_packed_projection_is_a_cpu_only_path(device: str) -> None:
    from glmtune.modeling import projection

    layer = torch.nn.Linear(32, projection._MIN_VOCAB, bias=False).to(device)
    hidden = torch.randn(1, 2, 32, device=device)
    with torch.inference_mode():
        logits = projection.project_to_vocab(hidden, layer)
    torch.testing.assert_close(logits, torch.nn.functional.linear(hidden, layer.weight), rtol=1e-4, atol=1e-4)
    packed = layer in projection._PACKED
    assert packed == (device == "cpu" and torch.backends.mkldnn.is_available()
                      and projection._packed_weight(layer) is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_int8_base_on_cuda_decodes_through_our_cuda_kernels(exports: Any, served: Any) -> None:
    pytest.importorskip("cpm_kernels", reason="glmtune[cuda] (cpm_kernels) is not installed")
    from glmtune.modeling import quantization_cuda

    (model,) = served(exports.get("int8", "v1"), name="int8", device="cuda").values()
    batch = _running_batch(model, ["你好"])
    assert quantization_cuda._get_kernels() is not None, "the kernels did not build: see the INFO log line"
    batch.step()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_default_kv_budget_and_memory_gauge_read_the_gpu() -> None:
    from glmtune_inference.memory import CUDA_KV_SHARE, default_kv_budget, device_memory_bytes

    device = resolve_device("cuda")
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    free, _ = torch.cuda.mem_get_info(device)
    assert abs(default_kv_budget(device) - CUDA_KV_SHARE * free) < 0.01 * free
    assert device_memory_bytes(device) >= held.numel()
    assert default_kv_budget(torch.device("cpu")) is None
