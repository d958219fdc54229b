"""The `glmtune` console script: one entry point, subcommands contributed by each component.

This registry lives in the app layer because it names every component; the core `glmtune` names none.

Each command module exposes ``register(subparsers)`` that adds its parsers (torch-free, so `--help` is
fast and the operator image works); the handler set with ``set_defaults(func=...)`` imports heavy
libraries only when it runs. Every component ships in the one distribution (and in every image), so each
module is always there: a failing import is a real error, never skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from glmtune import __version__
from glmtune.errors import GlmtuneError

COMMAND_MODULES = (
    "glmtune.modeling.cli",  # model init
    "glmtune_trainer.data.cli",  # data build|stats|show
    "glmtune_trainer.cli",  # train, export
    "glmtune_trainer.report",  # report
    "glmtune_inference.cli",  # chat, serve
    "glmtune.export_inspect",  # inspect
    "glmtune_app.pipeline",  # run
    "glmtune.crd",  # crd
    "glmtune_operator.cli",  # operator
)
DEBUG_HELP = "on an error, print the full traceback too (one line without it)"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every installed component's subcommands."""
    parser = argparse.ArgumentParser(
        prog="glmtune", description="Fine-tune and serve ChatGLM-family models, on a laptop or on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"glmtune {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _accept_debug_after_commands(subparsers, set())
    return parser


def _accept_debug_after_commands(subparsers: argparse._SubParsersAction, seen: set[int]) -> None:
    """Let `--debug` also follow a (sub)command (`glmtune run x.yaml --debug`), where users type it.

    SUPPRESS as default keeps a subcommand from resetting a `--debug` given before it; a command that
    defines its own `--debug` (the operator's debug logging) keeps it, and it sets the same flag.
    """
    for sub in subparsers.choices.values():
        if id(sub) in seen:  # aliases share one parser
            continue
        seen.add(id(sub))
        if "--debug" not in sub._option_string_actions:
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _accept_debug_after_commands(action, seen)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; exit 0 on success, 2 on invalid input, 1 on any other failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GlmtuneError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()  # with the library error it wraps (`raise ... from`), for bug reports
        print(f"glmtune {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
