"""The `glmtune` console script: one entry point, subcommands contributed by each component.

Each command module exposes ``register(subparsers)`` that adds its parsers (torch-free, so `--help` is
fast and the operator image works); the handler set with ``set_defaults(func=...)`` imports heavy
libraries only when it runs. A component that is not installed simply contributes no commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from glmtune import __version__
from glmtune.errors import GlmtuneError

COMMAND_MODULES = (
    "glmtune.modeling.cli",  # model init
    "glmtune_trainer.data.cli",  # data build|stats|show
    "glmtune_trainer.cli",  # train, export
    "glmtune_inference.cli",  # chat, serve
    "glmtune.pipeline",  # run
    "glmtune.crd",  # crd
    "glmtune_operator.cli",  # operator
)


def _load_command_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only "this component is absent" is silent; a missing dependency inside it is a real error.
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every installed component's subcommands."""
    parser = argparse.ArgumentParser(
        prog="glmtune", description="Fine-tune and serve ChatGLM-family models, on a laptop or on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"glmtune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = _load_command_module(name)
        if module is not None:
            module.register(subparsers)
    return parser


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
        print(f"glmtune {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
