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
from glmtune.fingerprint import FINGERPRINT_FILE, base_fingerprint, cached_file_digests, check_base_match
from glmtune_trainer import merge_stream
from glmtune_trainer.checkpoint import RUN_FILE, STATE_FILE, WEIGHTS_FILE, load_weights
from glmtune_trainer.loop import LoopState
from glmtune_trainer.methods import PREFIX_KEY, apply_method, load_overrides

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "ice_text.model", "tokenizer.model",
                   "tokenizer.json")
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


def _came_as_hf(run: dict[str, Any]) -> bool:
    """Whether the run's GLM-4 base came in the ``-hf`` layout (trained on its remote-code copy)."""
    if run["family"] != "glm4":
        return False
    from glmtune.modeling.glm4 import HF
    from glmtune.modeling.glm4_checkpoint import source_layout

    return source_layout(run["base_model"]) == HF


def _hf_source(run: dict[str, Any]) -> Path | None:
    """The ``-hf`` GLM-4 folder a run's remote-code base was converted from (None: not converted)."""
    if not _came_as_hf(run):
        return None
    from glmtune.modeling.glm4_checkpoint import SOURCE_LAYOUT_FILE

    source = storage.read_json_object(Path(run["base_model"]) / SOURCE_LAYOUT_FILE).get("source")
    return Path(source) if isinstance(source, str) and Path(source).is_dir() else None


def _save_hf(model: torch.nn.Module, base: Path, out: Path) -> None:
    """A merged/full GLM-4 export back in the ``-hf`` layout it came in (GlmForCausalLM weights and config,
    tokenizer.json with a plain PreTrainedTokenizerFast config)."""
    from glmtune.modeling.glm4 import HF
    from glmtune.modeling.glm4_checkpoint import save_glm4
    from glmtune.tokenization import load_tokenizer

    save_glm4(model, out, HF, tokenizer=load_tokenizer(base))


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
    bundle = out / BUNDLED_BASE
    shutil.copytree(run["base_model"], bundle, ignore=shutil.ignore_patterns(storage.MANIFEST_NAME, FINGERPRINT_FILE, ".*"))
    # A fresh fingerprint cache for the copy (from the digests the base's own cache vouches for), listed in the
    # export's manifest: the operator reads it from S3 without the weights.
    base_fingerprint(bundle, known_sha256=cached_file_digests(run["base_model"]))
    return BUNDLED_BASE


def checked_base_fingerprint(checkpoint_dir: Path, run: dict[str, Any], allow_mismatch: bool = False) -> str:
    """The fingerprint of the base the run was trained over, after checking that `run["base_model"]` still holds
    that base (a folder replaced since, or a checkpoint moved to a machine where the path names another model,
    would merge the trained delta into the wrong weights). Runs from before fingerprints are not checked."""
    current = base_fingerprint(run["base_model"])
    recorded = run.get("base_fingerprint")
    check_base_match(recorded, current, export_where=str(checkpoint_dir / RUN_FILE), base_where=str(run["base_model"]),
                     allow_mismatch=allow_mismatch)
    return recorded or current


def checkpoint_metrics(checkpoint_dir: Path) -> dict[str, float]:
    """The run's figures at this checkpoint (held-out eval_loss, perplexity, bleu4, rouge_l; train_loss)."""
    path = checkpoint_dir / STATE_FILE
    return LoopState.from_json(storage.read_json_object(path)).run_metrics() if path.is_file() else {}


def tokenizer_facts(out: Path) -> tuple[dict[str, str], int | None, int | None]:
    """sha256 of each tokenizer file in `out`, and the end / padding token ids the tokenizer gives."""
    from glmtune.tokenization import load_tokenizer

    digests = {name: storage.file_sha256(out / name) for name in TOKENIZER_FILES if (out / name).is_file()}
    if not digests:
        return {}, None, None
    tokenizer = load_tokenizer(out)
    return digests, _token_id(tokenizer, "eos_token_id"), _token_id(tokenizer, "pad_token_id")


def _token_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, int) and value >= 0 else None


def write_export(checkpoint_dir: Path, out: Path, mode: str, bits: int | None, remote_export: bool = False,
                 allow_base_mismatch: bool = False) -> str:
    """Write the export files into the (empty) directory `out`; returns the kind. `remote_export` says `out` will
    be uploaded (a local base is then bundled inside); `allow_base_mismatch` rebuilds over a base whose
    fingerprint differs from the one the run recorded (a warning instead of an error)."""
    import glmtune
    from glmtune.modeling import save_pretrained

    run = read_run(checkpoint_dir)
    method = run["method"]["name"]
    kind = export_kind(method, mode)
    if bits is not None and kind not in ("merged", "full"):
        raise InvalidInputError(f"re-quantization applies to merged or full exports, not {kind!r}", where="bits")
    fingerprint = checked_base_fingerprint(checkpoint_dir, run, allow_base_mismatch)
    base = Path(run["base_model"])
    base_ref = base_reference(run, out, remote_export) if kind in ("adapter", "prefix") else None
    hf_source = _hf_source(run) if base_ref not in (None, BUNDLED_BASE) else None
    if hf_source is not None:
        # the export names the -hf base the run was given, not the remote-code copy it trained on: vouch for that
        fingerprint = base_fingerprint(hf_source)
    if kind == "merged" and merge_stream.streaming_unsupported(run) is None and not _came_as_hf(run):
        # LoRA merges stream the base one tensor at a time: peak ~ one 2 GB shard, not the model (issue 12)
        merge_stream.write_merged(checkpoint_dir, out, run, bits=bits)
    elif kind == "adapter":
        model = rebuild_trained_model(checkpoint_dir, run, merge=False)
        model.peft_config["default"].base_model_name_or_path = base_ref
        model.save_pretrained(str(out), safe_serialization=True)
    elif kind == "prefix":
        _write_prefix(rebuild_trained_model(checkpoint_dir, run, merge=False), out)
    else:
        model = rebuild_trained_model(checkpoint_dir, run, merge=True)
        if kind == "merged":
            model = model.merge_and_unload()
        if bits:
            model.quantize(bits)
        if not bits and _came_as_hf(run):
            _save_hf(model, base, out)
        else:  # the int8/int4 format exists in the remote-code layout only
            save_pretrained(model, out)
    if not (out / "tokenizer_config.json").is_file():
        _copy_tokenizer(base, out)
    tokenizer_sha256, eos_id, pad_id = tokenizer_facts(out)
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
        metrics=checkpoint_metrics(checkpoint_dir), base_fingerprint=fingerprint, tokenizer_sha256=tokenizer_sha256,
        eos_token_id=eos_id, pad_token_id=pad_id, glmtune_version=glmtune.__version__,
    )
    write_export_info(out, info)
    # Before the manifest, which then lists report.html: the report travels with the export (S3 too).
    from glmtune_trainer.report import REPORT_FILE, run_workdir, write_report

    write_report(run_workdir(checkpoint_dir), out / REPORT_FILE, checkpoint_dir=checkpoint_dir, export_dir=out)
    return kind


def export(checkpoint_dir: str | os.PathLike[str], out_uri: str, mode: str = "merged",
           bits: int | None = None, allow_base_mismatch: bool = False) -> ExportResult:
    """Export `checkpoint_dir` (local or `s3://`) to `out_uri` (local directory or `s3://` prefix).

    A local export appears under its final name only when complete (manifest included); an `s3://`
    export uploads the manifest last, and a retried upload skips files already there. The base the checkpoint
    names must be the one it was trained over (same fingerprint) unless `allow_base_mismatch`.
    """
    source = storage.fetch(checkpoint_dir, require_manifest=storage.is_s3_uri(str(checkpoint_dir)))
    if storage.is_s3_uri(out_uri):
        with tempfile.TemporaryDirectory(prefix="glmtune-export-") as tmp:
            staging = Path(tmp) / "export"
            staging.mkdir()
            kind = write_export(Path(source), staging, mode, bits, remote_export=True,
                                allow_base_mismatch=allow_base_mismatch)
            result = storage.upload_dir(staging, out_uri)
            return ExportResult(uri=out_uri, kind=kind, files=sorted(result["manifest"]["files"]))
    target = Path(out_uri.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.exporting-", dir=target.parent))
    try:
        kind = write_export(Path(source), staging, mode, bits, allow_base_mismatch=allow_base_mismatch)
        manifest = storage.write_manifest(staging)
        storage.publish_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(uri=str(target), kind=kind, files=sorted(manifest["files"]))
