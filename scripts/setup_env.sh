#!/usr/bin/env bash
# Creates .venv (if needed) with everything glmtune and its tests use; safe to run repeatedly.
# torch goes in first so pip takes the CPU build instead of a multi-GB CUDA one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
stamp=".venv/.glmtune-setup"
want="$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
