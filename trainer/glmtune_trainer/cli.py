"""`glmtune train SPEC` and `glmtune export CHECKPOINT OUT`; parsers are torch-free, handlers import lazily."""

from __future__ import annotations

import argparse
import os
import sys
from typing import get_args

from glmtune.spec.output import Bits


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` and `export` commands."""
    train = subparsers.add_parser(
        "train", help="fine-tune a model from a spec file",
        description="Train as the GLMFineTune spec says (single process; under torchrun, one rank of many). "
                    "Checkpoints, logs and records go to the work directory; the model is exported at the end to "
                    "output.uri (a relative one inside the work directory, as with `glmtune run`).",
    )
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    export = subparsers.add_parser(
        "export", help="export a training checkpoint",
        description="Write a checkpoint as merged weights in the original ChatGLM format, or as an adapter "
                    "(LoRA in peft format; ptv2 always exports its prefix encoder), to a directory or s3:// prefix.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="a step-N checkpoint directory or s3:// URI (with --format gguf also a model folder "
                             "or export)")
    export.add_argument("out", metavar="OUT_URI", help="output directory or s3://bucket/prefix")
    mode = export.add_mutually_exclusive_group()
    mode.add_argument("--merge", dest="mode", action="store_const", const="merged",
                      help="merge adapters into the base weights (default)")
    mode.add_argument("--adapter-only", dest="mode", action="store_const", const="adapter",
                      help="write only the adapter (peft format), applied over the base model")
    export.add_argument("--bits", type=int, choices=get_args(Bits), help="re-quantize merged/full weights to int8/int4")
    export.add_argument("--format", dest="export_format", choices=("glmtune", "gguf"), default="glmtune",
                        help="glmtune: the original ChatGLM layout (default); gguf: one file OUT for llama.cpp "
                             "(ChatGLM2/3 only; a checkpoint is merged first; also reads model folders and exports)")
    export.add_argument("--gguf-type", choices=("f32", "f16", "q8_0", "q4_0"),
                        help="tensor type of a --format gguf file (default f16)")
    export.add_argument("--allow-base-mismatch", action="store_true",
                        help="export even when the base the checkpoint names is not the one it was trained over "
                             "(its fingerprint differs; refused by default)")
    export.set_defaults(func=run_export, mode="merged")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `glmtune train` and `python -m glmtune_trainer`."""
    parser.add_argument("spec", metavar="SPEC", help="GLMFineTune YAML file (full object or bare spec)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set training.maxSteps=100 (repeatable)")
    parser.add_argument("--workdir", default=os.environ.get("GLMTUNE_WORKDIR"),
                        help="folder for records, checkpoints, logs and a relative output.uri (default: "
                             "$GLMTUNE_WORKDIR or ./glmtune-runs/<spec name>)")


def run_train(args: argparse.Namespace) -> int:
    """Handler of `glmtune train`: relaunch under torchrun in a multi-process PyTorchJob pod, else train.

    The work directory and the spec's locations resolve exactly as in `glmtune run` (a relative output.uri
    lands in the work directory)."""
    from glmtune.spec import load_spec_file
    from glmtune_trainer.distributed import torchrun_command
    from glmtune_trainer.seam import prepare, run_locations

    spec = load_spec_file(args.spec, args.overrides)
    relaunch = torchrun_command(_train_argv(args))
    if relaunch is not None:
        import subprocess

        return subprocess.call(relaunch)
    from glmtune_trainer.run import train

    spec, workdir = run_locations(spec, args.workdir)
    result = train(prepare(spec, workdir))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {result.checkpoint_dir}", file=sys.stderr)
        if result.export is not None:
            print(f"exported ({result.export.kind}): {result.export.uri}", file=sys.stderr)
    return 0


def _train_argv(args: argparse.Namespace) -> list[str]:
    argv = [args.spec]
    for item in args.overrides:
        argv += ["--set", item]
    if args.workdir:
        argv += ["--workdir", args.workdir]
    return argv


def run_export(args: argparse.Namespace) -> int:
    """Handler of `glmtune export`."""
    from glmtune.errors import InvalidInputError

    if getattr(args, "export_format", "glmtune") == "gguf":
        if args.mode != "merged" or args.bits is not None:
            raise InvalidInputError("a GGUF export is merged weights in its own tensor type: use --gguf-type "
                                    "instead of --adapter-only/--bits", where="--format gguf")
        from glmtune_trainer.gguf_export import export_gguf

        written = export_gguf(args.checkpoint, args.out, args.gguf_type or "f16",
                              allow_base_mismatch=args.allow_base_mismatch)
        print(f"exported (gguf {written.gguf_type}): {written.path}")
        return 0
    if getattr(args, "gguf_type", None) is not None:
        raise InvalidInputError("--gguf-type applies to --format gguf only", where="--gguf-type")
    from glmtune_trainer.export import export

    result = export(args.checkpoint, args.out, args.mode, args.bits, allow_base_mismatch=args.allow_base_mismatch)
    print(f"exported ({result.kind}): {result.uri}")
    return 0
