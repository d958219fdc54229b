"""`glmtune model init`: write a random-init ChatGLM model + tiny tokenizer directory (demos, tests)."""

from __future__ import annotations

import argparse

FAMILIES = ("v1", "v2", "v3")
SIZES = ("tiny", "small")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `model` command and its `init` subcommand (torch is imported only when it runs)."""
    model = subparsers.add_parser("model", help="create model directories", description="Model utilities.")
    actions = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init", help="write a random-init model with a tiny tokenizer",
        description="Write a random-init ChatGLM model (config.json, safetensors weights) and a freshly trained "
                    "tiny tokenizer to OUT, in the published layout: `glmtune chat OUT` and every loader read it.",
    )
    init.add_argument("--family", choices=FAMILIES, required=True,
                      help="v1 = ChatGLM-6B, v2 = ChatGLM2-6B, v3 = ChatGLM3-6B (v2 architecture, v3 tokenizer)")
    init.add_argument("--size", choices=SIZES, default="tiny",
                      help="tiny: 2 layers, hidden 64; small: 4 layers, hidden 512, 8 heads (default: tiny)")
    init.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    init.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from glmtune.modeling.tiny import create_model_dir

    path = create_model_dir(args.family, args.size, args.out, seed=args.seed)
    print(path)
    return 0
