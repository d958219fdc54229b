"""Export a training checkpoint in a form the rest of the world loads (layout: the export contract).

LoRA / AdaLoRA merge into the float base and are written in the ORIGINAL key format (sharded
safetensors + config.json + tokenizer), or as a peft adapter; ptv2 writes only the prefix encoder and a
config carrying `pre_seq_len`; freeze / full write the whole model. Merged and full exports can be
re-quantized to int8/int4. `glmtune-export.json` and then the checksum manifest are written last.

An adapter or prefix export names its base so that every reader of the export can reach it: a remote base as
its URI, a local base by its absolute path when the export is local too; when the export goes to S3 and the
base only exists on the trainer's disk (a `model.create` base, a local path), the base travels inside the
export as `base/` and is recorded relative.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import BUNDLED_BASE, ExportInfo, write_export_info
from glmtune_trainer.checkpoint import RUN_FILE, WEIGHTS_FILE, load_weights
from glmtune_trainer.methods import PREFIX_KEY, apply_method, load_overrides

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "ice_text.model", "tokenizer.model")
PREFIX_WEIGHTS = "prefix_encoder.safetensors"
MODES = ("merged", "adapter")


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and what it is."""

    uri: str
    kind: str
    files: list[str]


def export_kind(method: str, mode: str) -> str:
    """The export kind for a method and a requested mode ("merged" | "adapter")."""
    if mode not in MODES:
        raise InvalidInputError(f"export mode must be one of {', '.join(MODES)}, not {mode!r}", where="mode")
    if method == "ptv2":
        return "prefix"
    if method in ("lora", "adalora"):
        return "merged" if mode == "merged" else "adapter"
    if mode == "adapter":
        raise InvalidInputError(f"method {method!r} trains whole weights and has no adapter: export it merged",
                                where="spec.output.export")
    return "full"


def read_run(checkpoint_dir: Path) -> dict[str, Any]:
    """The run description saved with every checkpoint (base model, family, template, method)."""
    path = checkpoint_dir / RUN_FILE
    if not path.is_file() or not (checkpoint_dir / WEIGHTS_FILE).is_file():
        raise InvalidInputError(f"not a glmtune training checkpoint ({RUN_FILE} or {WEIGHTS_FILE} missing)",
                                where=str(checkpoint_dir))
    return storage.read_json_object(path)


def rebuild_trained_model(checkpoint_dir: Path, run: dict[str, Any], merge: bool = True) -> torch.nn.Module:
    """The trained model: the base (unquantized unless stored so), the method applied, trained weights loaded.

    `merge` says the weights will be folded into the base, which needs a float base checkpoint.
    """
    from glmtune.modeling import load_model
    from glmtune.spec import MethodSpec

    method = MethodSpec.model_validate(run["method"])
    base = run["base_model"]
    config = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    if merge and int(config.get("quantization_bit") or 0):
        raise InvalidInputError("the base checkpoint is stored quantized, so weights cannot be merged into it: "
                                "export the adapter instead (--adapter-only)", where=str(base))
    model = load_model(base, dtype=run["dtype"], config_overrides=load_overrides(method))
    model = apply_method(model, method, run["total_steps"])
    trained = load_weights(checkpoint_dir / WEIGHTS_FILE)
    missing_or_extra = set(trained) - set(dict(model.named_parameters()))
    if missing_or_extra:
        raise InvalidInputError(f"checkpoint weights do not fit the model: {sorted(missing_or_extra)[:5]}",
                                where=str(checkpoint_dir / WEIGHTS_FILE))
    model.load_state_dict(trained, strict=False)
    return model.eval()


def _copy_tokenizer(base: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)


def _write_prefix(model: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    from glmtune.modeling.checkpoint import family_of_config, original_config

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k.startswith(PREFIX_KEY)}
    save_file(state, str(out / PREFIX_WEIGHTS), metadata={"format": "pt"})
    config = original_config(model, family_of_config(model.config), torch.float32)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def base_reference(run: dict[str, Any], out: Path, remote_export: bool) -> str:
    """What an adapter/prefix export records as its base; bundles a local base into `out/base` for a remote
    export (an inference pod cannot reach the trainer's disk)."""
    base_uri = str(run["base_uri"])
    if "://" in base_uri and not base_uri.startswith("file://"):
        return base_uri
    local = Path(base_uri.removeprefix("file://")).resolve()
    if not remote_export:
        return str(local)
    shutil.copytree(run["base_model"], out / BUNDLED_BASE,
                    ignore=shutil.ignore_patterns(storage.MANIFEST_NAME, ".*"))
    return BUNDLED_BASE


def write_export(checkpoint_dir: Path, out: Path, mode: str, bits: int | None, remote_export: bool = False) -> str:
    """Write the export files into the (empty) directory `out`; returns the kind. `remote_export` says `out` will
    be uploaded (a local base is then bundled inside)."""
    from glmtune.modeling import save_pretrained

    run = read_run(checkpoint_dir)
    method = run["method"]["name"]
    kind = export_kind(method, mode)
    if bits is not None and kind not in ("merged", "full"):
        raise InvalidInputError(f"re-quantization applies to merged or full exports, not {kind!r}", where="bits")
    model = rebuild_trained_model(checkpoint_dir, run, merge=kind in ("merged", "full"))
    base = Path(run["base_model"])
    base_ref = base_reference(run, out, remote_export) if kind in ("adapter", "prefix") else None
    if kind == "adapter":
        model.peft_config["default"].base_model_name_or_path = base_ref
        model.save_pretrained(str(out), safe_serialization=True)
    elif kind == "prefix":
        _write_prefix(model, out)
    else:
        if kind == "merged":
            model = model.merge_and_unload()
        if bits:
            model.quantize(bits)
        save_pretrained(model, out)
    _copy_tokenizer(base, out)
    quant_bits, backend = bits or 0, "glmtune"
    if kind in ("adapter", "prefix"):
        quant_bits = int(run.get("quantization_bits") or 0)
        # run.json files from before the backend was recorded only ever meant glmtune's layers.
        backend = (run.get("quantization_backend") or "glmtune") if quant_bits else "glmtune"
    info = ExportInfo(
        kind=kind, family=run["family"], template=run["template"], method=method,
        base_model=base_ref,
        pre_seq_len=run["method"].get("ptv2", {}).get("pre_seq_len") if kind == "prefix" else None,
        prefix_projection=bool(run["method"].get("ptv2", {}).get("prefix_projection")) if kind == "prefix" else False,
        quantization_bit=quant_bits, quantization_backend=backend,
        run={"spec_name": run.get("spec_name"), "steps": run.get("step", 0)},
    )
    write_export_info(out, info)
    return kind


def export(checkpoint_dir: str | os.PathLike[str], out_uri: str, mode: str = "merged",
           bits: int | None = None) -> ExportResult:
    """Export `checkpoint_dir` (local or `s3://`) to `out_uri` (local directory or `s3://` prefix).

    A local export appears under its final name only when complete (manifest included); an `s3://`
    export uploads the manifest last, and a retried upload skips files already there.
    """
    source = storage.fetch(checkpoint_dir, require_manifest=storage.is_s3_uri(str(checkpoint_dir)))
    if storage.is_s3_uri(out_uri):
        with tempfile.TemporaryDirectory(prefix="glmtune-export-") as tmp:
            staging = Path(tmp) / "export"
            staging.mkdir()
            kind = write_export(Path(source), staging, mode, bits, remote_export=True)
            result = storage.upload_dir(staging, out_uri)
            return ExportResult(uri=out_uri, kind=kind, files=sorted(result["manifest"]["files"]))
    target = Path(out_uri.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.exporting-", dir=target.parent))
    try:
        kind = write_export(Path(source), staging, mode, bits)
        manifest = storage.write_manifest(staging)
        storage.publish_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(uri=str(target), kind=kind, files=sorted(manifest["files"]))
