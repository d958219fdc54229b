"""`glmtune inspect EXPORT`: what an export holds, how glmtune loads it, and how to use it with THUDM's code.

Torch-free and cheap: it reads `glmtune-export.json` and the manifest only (two small objects for `s3://`),
never the weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from glmtune import storage
from glmtune.errors import InvalidInputError
from glmtune.export_format import (
    EXPORT_FILE,
    KINDS_WITH_BASE,
    MANIFEST_FILE,
    ExportInfo,
    original_code_recipe,
    read_export_info,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` command."""
    parser = subparsers.add_parser(
        "inspect", help="describe an export: kind, base, quantization, files, and the original-code recipe",
        description="Describe a glmtune export (local folder or s3:// prefix) from its glmtune-export.json and "
                    "manifest, including how to load it with THUDM's original modeling code.")
    parser.add_argument("export", metavar="EXPORT", help="export folder or s3:// prefix")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run_inspect)


def describe(uri: str) -> dict[str, Any]:
    """The export's description (glmtune-export.json, recipe included) plus its files from the manifest."""
    info, manifest = _read(uri)
    files = (manifest or {}).get("files", {})
    data = info.to_json()
    data["original_code"] = original_code_recipe(info)
    data["complete"] = manifest is not None
    data["files"] = {name: entry.get("size") for name, entry in sorted(files.items())}
    return data


def _read(uri: str) -> tuple[ExportInfo, dict | None]:
    if storage.is_s3_uri(uri):
        prefix = uri.rstrip("/")
        folder = storage.fetch(f"{prefix}/{EXPORT_FILE}").parent
        manifest_uri = f"{prefix}/{MANIFEST_FILE}"
        manifest = storage.read_json_object(storage.fetch(manifest_uri)) if storage.list_objects(manifest_uri) else None
        return read_export_info(folder), manifest
    folder = Path(uri.removeprefix("file://"))
    if not folder.is_dir():
        raise InvalidInputError("no such export directory", where=uri)
    manifest = storage.read_manifest(folder) if (folder / MANIFEST_FILE).is_file() else None
    return read_export_info(folder), manifest


def render(data: dict[str, Any], uri: str) -> str:
    """The description as text for a terminal."""
    lines = [f"{uri}: {data['kind']} export of a {data['family']} model (method {data['method']}, "
             f"template {data['template']})" + ("" if data["complete"] else f"  [INCOMPLETE: no {MANIFEST_FILE}]")]
    if data["kind"] in KINDS_WITH_BASE:
        base = data["base_model"]
        inside = not ("://" in base or base.startswith("/"))
        lines.append(f"  base model:   {base}" + ("  (shipped inside this export)" if inside else ""))
    if data["kind"] == "prefix":
        lines.append(f"  prefix:       pre_seq_len {data['pre_seq_len']}, prefix_projection "
                     f"{str(data['prefix_projection']).lower()}")
    if data.get("base_fingerprint"):
        note = ("of the base it was trained over; any other base is refused" if data["kind"] in KINDS_WITH_BASE
                else "of the base it was made from")
        lines.append(f"  fingerprint:  {data['base_fingerprint']} ({note})")
    level = f"int{data['quantization_bit']}" if data["quantization_bit"] else "none"
    if data["quantization_bit"] and data.get("quantization_backend") == "bitsandbytes":
        layers = "8-bit Linear8bitLt" if data["quantization_bit"] == 8 else "4-bit NF4"
        lines.append(f"  quantization: {level} (the base it was trained over, loaded by bitsandbytes {layers}, "
                     "QLoRA; serve/chat --quantize overrides with glmtune's layers)")
    elif data["kind"] in KINDS_WITH_BASE:
        lines.append(f"  quantization: {level} (the base it was trained over; serve/chat --quantize overrides)")
    else:
        lines.append(f"  quantization: {level} (weights as stored)")
    run = data.get("run") or {}
    lines.append(f"  created:      {data['created']}" + (f", run {run['spec_name']!r}" if run.get("spec_name") else "")
                 + (f", {run['steps']} steps" if run.get("steps") else ""))
    lines += _provenance_lines(data)
    total = sum(size or 0 for size in data["files"].values())
    lines.append(f"  files:        {len(data['files'])} ({total / 1e6:.1f} MB)")
    recipe = data["original_code"]
    lines.append(f"With THUDM's original code ({recipe['repository']}, trust_remote_code):")
    lines += [f"  {i}. {step}" for i, step in enumerate(recipe["steps"], 1)]
    lines += [f"  note: {note}" for note in recipe["notes"]]
    return "\n".join(lines)


def _provenance_lines(data: dict[str, Any]) -> list[str]:
    """Tokenizer, glmtune version and the run's metrics; 'not recorded' for exports written before they were."""
    ids = ", ".join(f"{name} {data[key]}" for name, key in (("eos", "eos_token_id"), ("pad", "pad_token_id"))
                    if data.get(key) is not None)
    lines = [f"  tokenizer:    {ids or 'token ids not recorded'}"]
    lines += [f"    {name}  sha256 {digest}" for name, digest in sorted((data.get("tokenizer_sha256") or {}).items())]
    lines.append(f"  glmtune:      {data.get('glmtune_version') or 'version not recorded'}")
    metrics = data.get("metrics") or {}
    order = ("eval_loss", "perplexity", "bleu4", "rouge_l", "train_loss")
    names = [k for k in order if k in metrics] + sorted(k for k in metrics if k not in order)
    lines.append("  metrics:      " + (", ".join(f"{k} {metrics[k]:.4g}" for k in names) if names else "none recorded")
                 + ("" if "eval_loss" in metrics else " (no held-out eval_loss: the run had no data.evalSplit)"
                    if names else ""))
    return lines


def run_inspect(args: argparse.Namespace) -> int:
    """Print the description of one export."""
    data = describe(args.export)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(render(data, args.export))
    sys.stdout.flush()
    return 0
