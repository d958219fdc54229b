"""Entry for launchers: `torchrun ... -m glmtune_trainer SPEC [--set k=v]... [--workdir DIR]`.

In a PyTorchJob pod started without torchrun, PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK make
it relaunch itself under torchrun; under torchrun (or alone) it trains as this process's rank.
"""

from __future__ import annotations

import argparse
import sys

from glmtune.errors import GlmtuneError
from glmtune_trainer.cli import add_train_arguments, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmtune_trainer", description="Run one training job.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train(args)
    except GlmtuneError as exc:
        print(f"glmtune_trainer: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
