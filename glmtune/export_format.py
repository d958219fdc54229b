"""Reader and writer of `glmtune-export.json`, the file that says what an export directory holds.

Torch-free on purpose: the operator and the inference loader read it before deciding what to load.
The layout of an export directory is fixed by the export contract (merged / full / adapter / prefix).
`base_model` is a URI or an absolute path, or a path relative to the export itself for a base shipped inside
it (`base`). The file also states how to use the export with THUDM's original code (`original_code`, derived
from the rest on every write and never read back).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.storage import read_json_object

EXPORT_FILE = "glmtune-export.json"
MANIFEST_FILE = "glmtune-manifest.json"
# The run's training report, written into the export before its manifest (served at /report, linked by the operator).
REPORT_FILE = "report.html"
FORMAT_VERSION = 1
KINDS = ("merged", "full", "adapter", "prefix")
METHODS = ("lora", "adalora", "ptv2", "freeze", "full")
FAMILIES = ("v1", "v2", "v3", "glm4")
# What quantized the base an adapter/prefix was trained over: glmtune's weight-only int8/int4 layers, or
# bitsandbytes' (Linear8bitLt / 4-bit NF4, QLoRA). Files written before the field existed mean "glmtune".
QUANTIZATION_BACKENDS = ("glmtune", "bitsandbytes")
# Kinds that hold only a delta and need the base model they were trained from.
KINDS_WITH_BASE = ("adapter", "prefix")
# Where a base model shipped inside its adapter/prefix export lives, relative to the export.
BUNDLED_BASE = "base"
ORIGINAL_REPOS = {"v1": "THUDM/chatglm-6b", "v2": "THUDM/chatglm2-6b", "v3": "THUDM/chatglm3-6b",
                  "glm4": "THUDM/glm-4-9b-chat"}
ORIGINAL_CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "quantization.py",
                       "tokenization_chatglm.py")
_DERIVED_KEYS = ("original_code",)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ExportInfo:
    """What an export directory holds and how to load it."""

    kind: str
    family: str
    template: str
    method: str
    base_model: str | None = None
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    quantization_bit: int = 0
    quantization_backend: str = "glmtune"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    run: dict[str, Any] = field(default_factory=dict)
    # Held-out figures of the run that made the export ("eval_loss", "perplexity", "bleu4", "rouge_l",
    # "train_loss"): the operator's promotion gate compares them with the model now serving.
    metrics: dict[str, float] = field(default_factory=dict)
    # What the export must be combined with (absent in files written before they were recorded): the fingerprint
    # of the base it was trained over (glmtune.fingerprint), the tokenizer files' sha256, the special token ids
    # generation stops and pads with, and the glmtune version that wrote it.
    base_fingerprint: str | None = None
    tokenizer_sha256: dict[str, str] = field(default_factory=dict)
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    glmtune_version: str | None = None
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}", "kind")
        _check(self.family in FAMILIES, f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}", "family")
        _check(self.template in FAMILIES, f"template must be one of {', '.join(FAMILIES)}", "template")
        _check(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}", "method")
        _check(self.quantization_bit in (0, 4, 8), "quantization_bit must be 0, 4 or 8", "quantization_bit")
        _check(self.quantization_backend in QUANTIZATION_BACKENDS,
               f"quantization_backend must be one of {', '.join(QUANTIZATION_BACKENDS)}, "
               f"got {self.quantization_backend!r}", "quantization_backend")
        if self.quantization_backend == "bitsandbytes":
            # Only a LoRA/AdaLoRA adapter trains over bitsandbytes layers; other kinds store or re-quantize weights.
            _check(self.kind == "adapter" and self.quantization_bit in (4, 8),
                   "quantization_backend 'bitsandbytes' needs kind 'adapter' and quantization_bit 4 or 8",
                   "quantization_backend")
        _check(self.format == FORMAT_VERSION, f"unsupported format {self.format!r} (this glmtune reads 1)", "format")
        if self.kind in KINDS_WITH_BASE:
            _check(bool(self.base_model), f"kind {self.kind!r} needs base_model", "base_model")
        if self.kind == "prefix":
            _check(isinstance(self.pre_seq_len, int) and self.pre_seq_len > 0,
                   "kind 'prefix' needs a positive pre_seq_len", "pre_seq_len")
        _check(self.base_fingerprint is None or bool(_HEX64.match(str(self.base_fingerprint))),
               "base_fingerprint must be 64 lowercase hex digits (a sha256)", "base_fingerprint")
        _check(isinstance(self.tokenizer_sha256, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in self.tokenizer_sha256.items()),
            "tokenizer_sha256 must map file names to sha256 hex digests", "tokenizer_sha256")
        for key in ("eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0),
                   f"{key} must be a non-negative integer", key)
        _check(self.glmtune_version is None or isinstance(self.glmtune_version, str),
               "glmtune_version must be a string", "glmtune_version")

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk, keys in the contract's order."""
        data = asdict(self)
        order = ("format", "kind", "family", "template", "method", "base_model", "base_fingerprint", "pre_seq_len",
                 "prefix_projection", "quantization_bit", "quantization_backend", "eos_token_id", "pad_token_id",
                 "tokenizer_sha256", "glmtune_version", "created", "run", "metrics")
        return {**{key: data[key] for key in order}, "original_code": original_code_recipe(self)}


def original_code_recipe(info: ExportInfo) -> dict[str, Any]:
    """How to run this export with THUDM's original modeling code instead of glmtune: which files to put where,
    the loading steps, and what differs (shown by `glmtune inspect`, written into glmtune-export.json)."""
    repo = ORIGINAL_REPOS[info.family]
    files = ", ".join(ORIGINAL_CODE_FILES)
    bits = info.quantization_bit
    load = "model = AutoModel.from_pretrained({folder}, trust_remote_code=True{config}).float()  # or .half().cuda()"
    tokenizer = "tokenizer = AutoTokenizer.from_pretrained(this folder, trust_remote_code=True)"
    if info.kind in KINDS_WITH_BASE:
        folder = "the base model folder (base_model)"
        steps = [f"copy {files} from the Hugging Face repository {repo} into {folder} and into this folder"]
    else:
        folder = "this folder"
        steps = [f"copy {files} from the Hugging Face repository {repo} into this folder"]
    if info.kind == "prefix":
        steps += [
            f"config = AutoConfig.from_pretrained(base folder, trust_remote_code=True, pre_seq_len={info.pre_seq_len}, "
            f"prefix_projection={info.prefix_projection})",
            load.format(folder="base folder", config=", config=config"),
            "state = safetensors.torch.load_file('prefix_encoder.safetensors')",
            "model.transformer.prefix_encoder.load_state_dict({k.removeprefix('transformer.prefix_encoder.'): v "
            "for k, v in state.items()})",
        ]
    elif info.kind == "adapter":
        steps += [load.format(folder="base folder", config=""),
                  "model = peft.PeftModel.from_pretrained(model, this folder)  # merge_and_unload() to merge"]
    else:
        steps.append(load.format(folder="this folder", config=""))
    steps.append(tokenizer)
    notes = []
    if bits and info.quantization_backend == "bitsandbytes":
        quant = ("BitsAndBytesConfig(load_in_8bit=True)" if bits == 8 else "BitsAndBytesConfig(load_in_4bit=True, "
                 "bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=the training dtype)")
        notes.append(f"trained over the base loaded by bitsandbytes ({'8-bit' if bits == 8 else '4-bit NF4'}, QLoRA): "
                     f"from_pretrained(..., quantization_config={quant}) reproduces that base; in full precision "
                     "the answers can differ slightly")
    elif bits and info.kind in KINDS_WITH_BASE:
        notes.append(f"trained over the base quantized to int{bits}: model.quantize({bits}) reproduces that base (the "
                     f"original ptuning/main.py does it with --quantization_bit {bits}); in full precision the answers "
                     "can differ slightly")
    elif bits:
        notes.append(f"the weights are stored int{bits} (config.json quantization_bit, the chatglm-6b-int4 layout); "
                     "the original quantization.py dequantizes with cpm_kernels, i.e. on a CUDA GPU only")
    if info.family == "glm4" and info.kind not in KINDS_WITH_BASE:
        notes.append("an export of a model that came in the -hf layout (config.json model_type 'glm') needs no remote "
                     "code: AutoModelForCausalLM.from_pretrained(this folder) and AutoTokenizer.from_pretrained(this "
                     "folder) load it with transformers' own GlmForCausalLM")
    if info.family == "v1":
        notes.append("the original ChatGLM-6B code builds Linear and Embedding weights in float16 and copies the "
                     "checkpoint into them, so float32 weights are rounded to float16 on load (even with .float() "
                     "after): its answers can differ slightly from glmtune's float32 ones")
    return {"repository": repo, "files": list(ORIGINAL_CODE_FILES), "steps": steps, "notes": notes}


def _check(condition: bool, message: str, key: str) -> None:
    if not condition:
        raise InvalidInputError(message, where=f"{EXPORT_FILE}:{key}")


def write_export_info(directory: str | os.PathLike[str], info: ExportInfo) -> Path:
    """Write `glmtune-export.json` into `directory` atomically; returns its path."""
    directory = Path(directory)
    target = directory / EXPORT_FILE
    storage.atomic_write_bytes(target, (json.dumps(info.to_json(), indent=2, ensure_ascii=False) + "\n").encode())
    return target


def parse_export_info(data: Any, where: str = EXPORT_FILE) -> ExportInfo:
    """Validate a decoded `glmtune-export.json` object; unknown keys are an error so typos surface."""
    if not isinstance(data, dict):
        raise InvalidInputError("must be a JSON object", where=where)
    data = {k: v for k, v in data.items() if k not in _DERIVED_KEYS}
    allowed = {f for f in ExportInfo.__dataclass_fields__}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidInputError(f"unknown keys {unknown}", where=where)
    for key in ("kind", "family", "template", "method"):
        if key not in data:
            raise InvalidInputError(f"missing key {key!r}", where=where)
    if not isinstance(data.get("run", {}), dict):
        raise InvalidInputError("run must be an object", where=f"{where}:run")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items()):
        raise InvalidInputError("metrics must be an object of names to numbers", where=f"{where}:metrics")
    return ExportInfo(**data)


def read_export_info(directory: str | os.PathLike[str], *, require_complete: bool = False) -> ExportInfo:
    """Read `glmtune-export.json` from an export directory.

    With `require_complete`, a directory without `glmtune-manifest.json` (an interrupted upload or
    write) is refused, as the export contract asks of readers that need a finished export.
    """
    directory = Path(directory)
    path = directory / EXPORT_FILE
    if not path.is_file():
        raise InvalidInputError(f"not a glmtune export: {EXPORT_FILE} is missing", where=str(directory))
    if require_complete and not (directory / MANIFEST_FILE).is_file():
        raise InvalidInputError(f"incomplete export: {MANIFEST_FILE} is missing", where=str(directory))
    return parse_export_info(read_json_object(path), where=str(path))
