#!/usr/bin/env bash
# The README's quickstart: set up .venv (idempotent), then fine-tune a tiny ChatGLM created from scratch on
# examples/data/quickstart.jsonl and serve it with the OpenAI API on 127.0.0.1 until Ctrl-C.
# Arguments go to `glmtune run` (e.g. --port 8001, --workdir DIR); GLMTUNE_WORKDIR and GLMTUNE_PORT do the
# same from the environment. The run lands in ./glmtune-runs/quickstart unless told otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/glmtune run examples/quickstart.yaml --serve "$@"
