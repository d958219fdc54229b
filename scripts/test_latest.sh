#!/usr/bin/env bash
# Runs the model, inference, tokenization and trainer tests against the NEWEST releases of every dependency
# (no constraints file; only torch stays pinned), in its own venv .venv-latest, so a release that breaks us
# shows up before requirements/constraints.txt moves.
# Usage: scripts/test_latest.sh [pytest args...]  e.g. -x -m 'not slow' tests/core/model/test_generate_compat.py
# Test paths among the args replace the default four folders; options alone narrow those folders.
# torch goes in first so pip takes the CPU build on disk instead of a multi-GB CUDA one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
venv=.venv-latest
torch_pin="torch==${TORCH_VERSION:-2.13.0}"  # torch moves with the CUDA images, not with this check
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$torch_pin"
# --upgrade (eager): every dependency moves to its newest release, not only the ones missing from the venv;
# the torch pin keeps the upgrade from replacing the CPU build with a newer multi-GB CUDA one.
echo "$torch_pin" > "$venv/torch-pin.txt"
"$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -c "$venv/torch-pin.txt" -e ".[dev]"
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "kopf", "fastapi"):
    print(f"{name}=={version(name)}")
EOF
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GLMTUNE_SHARED="${GLMTUNE_SHARED:-$root/../shared}"
given_path=0
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then given_path=1; fi
done
if [ "$given_path" -eq 0 ]; then
  set -- "$@" tests/core tests/inference tests/trainer
fi
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
