"""Export a ChatGLM2/ChatGLM3 model as one GGUF file for llama.cpp's "chatglm" architecture (the laptop door).

The source is a model folder in THUDM's layout, a glmtune export (merged, full, or an adapter that is merged
here), or a training checkpoint (merged first with the ordinary export). Tensors are streamed one at a time
from the (memory-mapped) shards into the GGUF file, so a 6B model never sits in memory whole; q4_0 uses the
`gguf` package's own quantizer row chunk by row chunk, q8_0 a faster bit-identical port of it (`quantize_q8_0`).
Names and metadata follow what llama.cpp's loader for "chatglm" reads (fused QKV with bias, fused gate+up
`ffn_up`, RMSNorm, RoPE on half of each head's dims, pairs adjacent); the SentencePiece vocabulary goes in as a
"llama" (SPM) tokenizer padded to the embedding rows. ChatGLM-6B (v1) has no llama.cpp architecture and is
refused before any work.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune_trainer.gguf_quants import quantize_q8_0

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = "chatglm"
_CHUNK_BYTES = 64 << 20  # float32 rows quantized at a time: bounds the quantizer's temporaries
# ChatGLM3's conversation format; llama.cpp recognises it ("[gMASK]sop") as its built-in chatglm3 template.
V3_CHAT_TEMPLATE = ("[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>\n {{ message['content'] }}"
                    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass(frozen=True)
class GGUFResult:
    """The written file, its tensor type and how many tensors it holds."""

    path: Path
    gguf_type: str
    tensors: int


def export_gguf(source: str | os.PathLike[str], out: str | os.PathLike[str], gguf_type: str = "f16",
                allow_base_mismatch: bool = False) -> GGUFResult:
    """Write `source` (model folder, glmtune export or training checkpoint; local or s3://) as a GGUF file at
    `out` (a file path, or an existing directory to put `model-<type>.gguf` in); the file appears complete or
    not at all. A checkpoint or adapter is merged over its base only when the base's fingerprint is the one it
    was trained over, unless `allow_base_mismatch`."""
    if gguf_type not in GGUF_TYPES:
        raise InvalidInputError(f"GGUF tensor type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}",
                                where="--gguf-type")
    if storage.is_s3_uri(str(out)):
        raise InvalidInputError("a GGUF export is one local file: give a local path", where=str(out))
    target = Path(str(out).removeprefix("file://")).expanduser()
    if target.is_dir():
        target = target / f"model-{gguf_type}.gguf"
    local = Path(storage.fetch(source)) if storage.is_s3_uri(str(source)) else Path(str(source).removeprefix("file://"))
    if not local.is_dir():
        raise InvalidInputError("no such checkpoint or model directory", where=str(source))
    kind = _source_kind(local)  # refuses v1 / prefix exports before anything heavy happens
    if kind == "model":
        return write_gguf(local, target, gguf_type)
    with tempfile.TemporaryDirectory(prefix="glmtune-gguf-", dir=_scratch_dir(target)) as tmp:
        merged = _merged_model_dir(local, kind, Path(tmp) / "merged", allow_base_mismatch)
        return write_gguf(merged, target, gguf_type)


def _scratch_dir(target: Path) -> Path:
    """The merged intermediate goes next to the output (same disk as the result, not a small /tmp)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def _refuse_family(family: str, where: str) -> None:
    if family == "v1":
        raise InvalidInputError("ChatGLM-6B (v1) has no llama.cpp architecture (its 2-D positions and GLM "
                                "attention mask are not in llama.cpp), so it cannot be exported as GGUF; "
                                "ChatGLM2/ChatGLM3 (v2/v3) models can", where=where)
    if family not in ("v2", "v3"):
        raise InvalidInputError(f"GGUF export covers ChatGLM2/ChatGLM3 (v2/v3), not family {family!r}", where=where)


def _source_kind(directory: Path) -> str:
    """"checkpoint", "adapter" or "model" (anything already holding full weights), after the v1/prefix checks."""
    from glmtune.export_format import EXPORT_FILE, read_export_info
    from glmtune.modeling.families import family
    from glmtune_trainer.checkpoint import RUN_FILE

    if (directory / RUN_FILE).is_file():
        run = storage.read_json_object(directory / RUN_FILE)
        _refuse_family(str(run.get("family")), str(directory / RUN_FILE))
        if (run.get("method") or {}).get("name") == "ptv2":
            raise InvalidInputError("a p-tuning v2 checkpoint is a prefix over the base, which GGUF cannot hold: "
                                    "export the base model instead", where=str(directory / RUN_FILE))
        return "checkpoint"
    if (directory / EXPORT_FILE).is_file():
        info = read_export_info(directory)
        _refuse_family(info.family, str(directory / EXPORT_FILE))
        if info.kind == "prefix":
            raise InvalidInputError("a prefix (p-tuning v2) export cannot be merged into weights, so GGUF cannot "
                                    "hold it", where=str(directory / EXPORT_FILE))
        if info.kind == "adapter":
            return "adapter"
    _refuse_family(family(directory), str(directory))
    return "model"


def _merged_model_dir(directory: Path, kind: str, out: Path, allow_base_mismatch: bool) -> Path:
    """A float model folder with the adapter/trained weights merged in (the ordinary merged export's code)."""
    if kind == "checkpoint":
        from glmtune_trainer.export import write_export

        out.mkdir()
        write_export(directory, out, "merged", None, allow_base_mismatch=allow_base_mismatch)
        return out
    from glmtune.export_loading import load_export
    from glmtune.modeling import save_pretrained
    from glmtune.tokenization import load_tokenizer

    model = load_export(directory, dtype="float32", merge_adapter=True, allow_base_mismatch=allow_base_mismatch)
    return save_pretrained(model, out, tokenizer=load_tokenizer(directory))


def _check_architecture(config: dict[str, Any], where: str) -> None:
    """Refuse ChatGLM2 variants llama.cpp's "chatglm" graph does not compute (it hard-codes these choices)."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    checks = (
        ("rmsnorm", config.get("rmsnorm", True), "llama.cpp uses RMSNorm"),
        ("original_rope", config.get("original_rope", True), "llama.cpp applies the original RoPE"),
        ("post_layer_norm", config.get("post_layer_norm", True), "llama.cpp applies a final norm"),
        ("apply_residual_connection_post_layernorm",
         not config.get("apply_residual_connection_post_layernorm", False), "llama.cpp adds the pre-norm residual"),
        ("add_bias_linear", not config.get("add_bias_linear", False), "llama.cpp has no dense/MLP biases"),
        ("kv_channels", int(config.get("kv_channels", hidden // heads)) * heads == hidden,
         "llama.cpp needs kv_channels * num_attention_heads == hidden_size"),
    )
    for key, ok, why in checks:
        if not ok:
            raise InvalidInputError(f"{why}; this model has {key}={config.get(key)!r}", where=f"{where}:{key}")


def _metadata(writer: Any, config: dict[str, Any], family: str, gguf_type: str, name: str) -> None:
    import gguf

    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = int(config.get("kv_channels", hidden // heads))
    kv_heads = int(config.get("multi_query_group_num", heads)) if config.get("multi_query_attention") else heads
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[gguf_type]
    writer.add_name(name)
    writer.add_context_length(int(config.get("seq_length", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["ffn_hidden_size"]))
    writer.add_block_count(int(config["num_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(config.get("layernorm_epsilon", 1e-5)))
    writer.add_rope_dimension_count(head_dim // 2)  # ChatGLM2 rotates the first half of each head
    writer.add_rope_freq_base(10000.0 * float(config.get("rope_ratio", 1.0)))
    writer.add_file_type(file_type)
    if gguf_type in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("glmtune.family", family)


def _vocabulary(writer: Any, model_dir: Path, family: str, rows: int) -> None:
    """The SentencePiece pieces, then the GLM special tokens after them, then "[PADn]" up to the embedding rows."""
    import gguf

    from glmtune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    sp = tokenizer.sp_model
    n_pieces = sp.get_piece_size()
    specials = {i: name for name, i in tokenizer.get_vocab().items() if i >= n_pieces}
    if max(specials, default=n_pieces) >= rows:
        raise InvalidInputError(f"the tokenizer has ids up to {max(specials)} but the model only {rows} embedding rows",
                                where=str(model_dir / "config.json"))
    kinds = gguf.TokenType
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(rows):
        if i < n_pieces:
            kind = (kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i) else
                    kinds.UNUSED if sp.is_unused(i) else kinds.BYTE if sp.is_byte(i) else kinds.NORMAL)
            tokens.append(sp.id_to_piece(i).encode("utf-8"))
            scores.append(float(sp.get_score(i)))
        elif i in specials:
            kind = kinds.CONTROL
            tokens.append(specials[i].encode("utf-8"))
            scores.append(0.0)
        else:
            kind = kinds.UNUSED
            tokens.append(f"[PAD{i}]".encode())
            scores.append(0.0)
        types.append(int(kind))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")  # llama.cpp's converter's name; SPM loaders ignore it
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(tokenizer.pad_token_id)
    # ChatGLM2/3 prompts start with "[gMASK]sop" (added by the chat template), never with <s>.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if family == "v3":
        writer.add_eot_token_id(tokenizer.get_command("<|user|>"))
        writer.add_chat_template(V3_CHAT_TEMPLATE)


@dataclass
class _Planned:
    name: str
    key: str
    shape: tuple[int, ...]
    qtype: Any
    nbytes: int
    byte_shape: tuple[int, ...]


class _Tensors:
    """Stored tensors by key across shards, one file open (memory-mapped) at a time: safetensors via safe_open,
    .bin via torch.load(mmap=True); shapes come from the headers without reading any data."""

    def __init__(self, directory: Path) -> None:
        from glmtune.modeling.checkpoint_io import weight_files

        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._path: Path | None = None
        self._file: Any = None
        for path in weight_files(directory):
            handle = self._open(path)
            for key in handle.keys():
                self.where[key] = path
                self.shapes[key] = tuple(handle.get_slice(key).get_shape() if hasattr(handle, "get_slice")
                                         else handle[key].shape)
            self.close()

    def _open(self, path: Path) -> Any:
        if self._path != path:
            from safetensors import safe_open

            self.close()
            try:
                if path.suffix == ".safetensors":
                    self._file = safe_open(str(path), framework="pt", device="cpu")
                else:
                    try:
                        self._file = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError:  # legacy (non-zip) .bin cannot be mapped
                        self._file = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise InvalidInputError(f"corrupt or unreadable weight file ({exc})", where=str(path)) from None
            self._path = path
        return self._file

    def get(self, key: str) -> torch.Tensor:
        handle = self._open(self.where[key])
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]

    def close(self) -> None:
        """Drop the open file (and with it the mapping of its pages)."""
        self._path, self._file = None, None


def _plan(tensors: _Tensors, config: dict[str, Any], gguf_type: str, where: str) -> list[_Planned]:
    """GGUF name, source key, logical shape and tensor type of every exported tensor, in source-file order."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    bits = int(config.get("quantization_bit") or 0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, int(config["num_layers"]))
    wanted = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[gguf_type]
    planned: list[_Planned] = []
    for key, shape in tensors.shapes.items():
        if key.endswith((".inv_freq", ".weight_scale")):
            continue  # RoPE tables are recomputed by llama.cpp; scales are consumed with their weights
        name = names.get_name(key.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InvalidInputError(f"tensor {key!r} has no place in llama.cpp's chatglm architecture", where=where)
        if f"{key}_scale" in tensors.shapes:
            if bits not in (4, 8):
                raise InvalidInputError(f"{key} is stored quantized but config.json has quantization_bit={bits}",
                                        where=f"{where}:quantization_bit")
            shape = (shape[0], shape[1] * 8 // bits)
        qtype = wanted
        if len(shape) != 2:
            qtype = gguf.GGMLQuantizationType.F32  # norms and biases stay float32, as llama.cpp's converter does
        elif gguf_type == "q4_0" and name == "output.weight":
            # llama.cpp's own q4_0 recipe keeps the output projection at higher precision (quality of every logit)
            qtype = gguf.GGMLQuantizationType.Q8_0
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16  # rows that do not split into whole blocks (tiny models)
        byte_shape = quant_shape_to_byte_shape(shape, qtype) if qtype not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else shape
        itemsize = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(qtype, 1)
        planned.append(_Planned(name, key, tuple(shape), qtype,
                                int(np.prod(byte_shape)) * itemsize, tuple(byte_shape)))
    missing = {"token_embd.weight", "output_norm.weight"} - {p.name for p in planned}
    if missing:
        raise InvalidInputError(f"the checkpoint lacks {sorted(missing)}", where=where)
    return planned


def _float_tensor(tensors: _Tensors, item: _Planned, bits: int) -> torch.Tensor:
    from glmtune.modeling.quantization import dequantize_weight

    value = tensors.get(item.key)
    if f"{item.key}_scale" in tensors.shapes:
        value = dequantize_weight(value, tensors.get(f"{item.key}_scale"), bits, torch.float32)
    return value


def _encode(value: torch.Tensor, item: _Planned) -> np.ndarray:
    """The tensor's bytes in its GGUF type; quantized row chunk by row chunk to bound the temporaries."""
    import gguf
    from gguf.quants import quantize

    if item.qtype == gguf.GGMLQuantizationType.F32:
        return value.to(torch.float32).contiguous().numpy()
    if item.qtype == gguf.GGMLQuantizationType.F16:
        return value.to(torch.float16).contiguous().numpy()
    if item.qtype == gguf.GGMLQuantizationType.Q8_0:
        return quantize_q8_0(value).reshape(item.byte_shape)
    rows = max(1, _CHUNK_BYTES // (4 * item.shape[-1]))
    out = np.empty(item.byte_shape, dtype=np.uint8)
    for start in range(0, item.shape[0], rows):
        chunk = value[start:start + rows].to(torch.float32).numpy()
        out[start:start + rows] = quantize(chunk, item.qtype)
    return out


def write_gguf(model_dir: Path, target: Path, gguf_type: str = "f16") -> GGUFResult:
    """Convert the model folder `model_dir` (ChatGLM2/3, THUDM layout, float or glmtune-quantized) to `target`."""
    import gguf

    from glmtune.modeling.families import family as family_of

    where = str(model_dir / "config.json")
    family = family_of(model_dir)
    _refuse_family(family, str(model_dir))
    config = storage.read_json_object(model_dir / "config.json")
    _check_architecture(config, where)
    tensors = _Tensors(model_dir)
    plan = _plan(tensors, config, gguf_type, str(model_dir))
    rows = next(p.shape[0] for p in plan if p.name == "token_embd.weight")
    bits = int(config.get("quantization_bit") or 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _metadata(writer, config, family, gguf_type, model_dir.name)
        _vocabulary(writer, model_dir, family, rows)
        for item in plan:
            dtype = np.uint8 if item.qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                else (np.float32 if item.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(item.name, item.byte_shape, np.dtype(dtype), item.nbytes,
                                   raw_dtype=item.qtype if dtype is np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            writer.write_tensor_data(_encode(_float_tensor(tensors, item, bits), item))
        writer.close()
        tensors.close()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        writer.close()
        tensors.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFResult(path=target, gguf_type=gguf_type, tensors=len(plan))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


