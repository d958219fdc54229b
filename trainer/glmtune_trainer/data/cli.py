"""`glmtune data build|stats|show`: build records once, inspect their statistics and what is trained."""

from __future__ import annotations

import argparse
import json
import sys
from typing import get_args

from glmtune.errors import InvalidInputError
from glmtune.spec.data import DataFormat, Strategy
from glmtune.spec.model import Family


def _spec_default(name: str):
    """Defaults come from the spec model (one source of truth for CLI, YAML and the CRD)."""
    from glmtune.spec.data import DataSpec

    return DataSpec.model_fields[name].default


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group."""
    data = subparsers.add_parser("data", help="build and inspect tokenized training records")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    build = commands.add_parser("build", help="parse, validate and tokenize data files into records")
    build.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="data files, directories, globs or s3://bucket/prefix (JSON, JSONL, .gz)",
    )
    build.add_argument("--tokenizer", required=True, help="tokenizer directory or s3:// URI")
    build.add_argument("--out", required=True, help="output directory for the records")
    build.add_argument("--template", choices=get_args(Family), help="chat template (default: the family's)")
    build.add_argument(
        "--strategy",
        choices=get_args(Strategy),
        default=_spec_default("strategy"),
    )
    build.add_argument("--max-length", type=int, default=_spec_default("max_length"))
    build.add_argument(
        "--format",
        choices=get_args(DataFormat),
        default="auto",
        help="record format (default: detected per file)",
    )
    build.add_argument("--workers", type=int, default=_spec_default("workers"), help="tokenizer processes")
    build.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=_spec_default("shuffle"))
    build.add_argument("--seed", type=int, default=_spec_default("seed"))
    build.add_argument("--per-file", action="store_true", help="one record set per input file (not mixed)")
    build.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip bad records (counted per reason) instead of stopping at the first",
    )
    build.add_argument(
        "--max-invalid-fraction",
        type=float,
        default=_spec_default("max_invalid_fraction"),
        help="with --skip-invalid, fail when more than this share of records is bad",
    )
    build.add_argument("--cache", help="reuse/store builds by hash in this folder or s3:// prefix")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)

    stats = commands.add_parser("stats", help="print the statistics of built records")
    stats.add_argument("directory", metavar="DIR")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=_stats)

    show = commands.add_parser("show", help="print sequence N decoded, with what is trained marked")
    show.add_argument("directory", metavar="DIR")
    show.add_argument("index", metavar="N", type=int)
    show.add_argument("--dataset", help="record set name (per-file builds)")
    show.set_defaults(func=_show)


def _build(args: argparse.Namespace) -> int:
    from glmtune_trainer.data.build import BuildConfig, build_records

    result = build_records(
        BuildConfig(
            inputs=args.inputs,
            tokenizer=args.tokenizer,
            out=args.out,
            template=args.template,
            strategy=args.strategy,
            max_length=args.max_length,
            workers=args.workers,
            shuffle=args.shuffle,
            seed=args.seed,
            mixed=not args.per_file,
            format=args.format,
            skip_invalid=args.skip_invalid,
            max_invalid_fraction=args.max_invalid_fraction,
            cache=args.cache,
            progress=not args.no_progress,
        )
    )
    stats = result.manifest["stats"]
    origin = {
        "built": "built",
        "local": "already built (same hash), reused",
        "cache": "restored from the cache (same hash)",
    }[result.origin]
    print(
        f"{result.out}: {origin}: {stats['samples']} samples -> {stats['sequences']} sequences, "
        f"{stats['tokens']} tokens, padding efficiency {stats['padding_efficiency']:.1%}, "
        f"truncated {stats['truncated']}",
        file=sys.stderr,
    )
    if result.skipped.invalid:
        print(
            f"skipped {result.skipped.invalid} invalid records:\n{result.skipped.summary()}", file=sys.stderr
        )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from glmtune_trainer.data.manifest import read_manifest

    manifest = read_manifest(args.directory)
    stats = manifest["stats"]
    if args.json:
        print(
            json.dumps(
                {
                    **stats,
                    "hash": manifest["hash"],
                    "strategy": manifest["strategy"],
                    "template": manifest["template"],
                    "max_length": manifest["max_length"],
                    "datasets": {
                        k: {"sequences": v["sequences"], "tokens": v["tokens"]}
                        for k, v in manifest["datasets"].items()
                    },
                    "invalid": manifest["invalid"],
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    print(
        f"records   {args.directory}  (hash {manifest['hash'][:16]}, template {manifest['template']}, "
        f"strategy {manifest['strategy']}, max length {manifest['max_length']})"
    )
    for key in ("samples", "windows", "sequences", "tokens", "trained_tokens", "truncated"):
        print(f"{key:<16}{stats[key]}")
    print(f"{'truncated share':<16}{stats['truncated_share']:.2%}")
    print(f"{'mean length':<16}{stats['mean_length']:.1f} (longest {stats['max_length_seen']})")
    print(
        f"{'padding eff.':<16}{stats['padding_efficiency']:.2%} dynamic (batch "
        f"{stats['padding_efficiency_batch_size']}), {stats['padding_efficiency_pad_to_max']:.2%} pad-to-max"
    )
    hist = stats["length_histogram"]
    top = max(hist["counts"]) or 1
    for low, high, count in zip(hist["edges"], hist["edges"][1:], hist["counts"], strict=False):
        print(f"  {low:>6}-{high:<6} {count:>8}  {'#' * round(40 * count / top)}")
    if manifest["invalid"]["records"]:
        print(f"invalid records skipped: {manifest['invalid']['by_reason']}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from glmtune.tokenization import load_tokenizer
    from glmtune_trainer.data.manifest import open_records, read_manifest

    manifest = read_manifest(args.directory)
    records = open_records(args.directory, args.dataset)
    if not 0 <= args.index < len(records):
        raise InvalidInputError(
            f"N must be in 0..{len(records) - 1}", where=f"{args.directory}[{args.index}]"
        )
    tokenizer = load_tokenizer(f"{args.directory}/{manifest['tokenizer']['dir']}")
    record = records[args.index]
    ids = record.input_ids.tolist()
    mask = record.loss_mask()
    print(
        f"sequence {args.index}: {len(ids)} tokens, {len(record.segments)} window(s), "
        f"{int(mask.sum())} trained"
    )
    for number, (start, size, untrained, context, sample) in enumerate(record.segments.tolist()):
        window = ids[start : start + size]
        print(
            f"-- window {number}: sample {sample}, tokens {start}..{start + size - 1}, "
            f"{untrained} untrained, {context} bidirectional"
        )
        print(f"   context (label -100): {tokenizer.decode(window[:untrained])!r}")
        print(f"   trained             : {tokenizer.decode(window[untrained:])!r}")
        print(f"   ids    : {window}")
        print(f"   labels : {''.join('+' if m else '.' for m in mask[start : start + size])}")
    return 0
