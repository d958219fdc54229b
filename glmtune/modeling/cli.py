"""`glmtune model init`: write a random-init ChatGLM model + tokenizer directory (demos, tests, benchmarks)."""

from __future__ import annotations

import argparse
from typing import get_args

from glmtune.spec.model import Family, Layout, Size

FAMILIES = get_args(Family)
SIZES = get_args(Size)
LAYOUTS = get_args(Layout)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `model` command and its `init` subcommand (torch is imported only when it runs)."""
    model = subparsers.add_parser("model", help="create model directories", description="Model utilities.")
    actions = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init", help="write a random-init model with a tiny or a given tokenizer",
        description="Write a random-init ChatGLM model (config.json, safetensors weights) and its tokenizer to OUT, "
                    "in the published layout: `glmtune chat OUT` and every loader read it. The tokenizer is a "
                    "freshly trained tiny one, or the one given with --tokenizer (e.g. a published model's: "
                    "the vocabulary size and special token ids then follow it).",
    )
    init.add_argument("--family", choices=FAMILIES, required=True,
                      help="v1 = ChatGLM-6B, v2 = ChatGLM2-6B, v3 = ChatGLM3-6B (v2 architecture, v3 tokenizer), "
                           "glm4 = GLM-4-9B (v2 architecture, GLM-4 tokenizer and template)")
    init.add_argument("--size", choices=SIZES, default="tiny",
                      help="transformer size, whatever the tokenizer: tiny: 2 layers, hidden 64; small: 4 layers, "
                           "hidden 512, 8 heads (default: tiny). With a published tokenizer the embedding and "
                           "output layers (vocabulary x hidden) hold most of the weights.")
    init.add_argument("--layout", choices=LAYOUTS, default="remote",
                      help="checkpoint layout: remote = THUDM's remote code (default), hf = transformers' "
                           "GlmForCausalLM (glm4 only)")
    init.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    init.add_argument("--tokenizer", metavar="PATH",
                      help="tokenizer directory (ice_text.model for v1, tokenizer.model for v2/v3/glm4) or s3:// "
                           "prefix to use instead of a tiny trained one; its family must match --family")
    init.add_argument("out", metavar="OUT", help="output directory (must not exist or be empty)")
    init.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from glmtune.modeling.tiny import create_model_dir

    path = create_model_dir(args.family, args.size, args.out, seed=args.seed, tokenizer=args.tokenizer,
                            layout=args.layout)
    print(path)
    return 0
