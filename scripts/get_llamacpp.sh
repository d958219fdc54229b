#!/usr/bin/env bash
# Builds llama-cpp-python from its sdist into its own venv (.venv-llamacpp) for the GGUF tests and the
# full-size decode benchmark; quick when already built (a stamp records the version that was built).
# From source (not a wheel) so llama.cpp is compiled for this CPU, the same way a laptop user builds it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
version="${LLAMACPP_PYTHON_VERSION:-0.3.36}"
venv="${LLAMACPP_VENV:-.venv-llamacpp}"
stamp="$venv/.glmtune-llamacpp"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# cmake 4 refuses the old cmake_minimum_required of a vendored dependency without the policy floor.
# Use every core the machine offers for the compile; it takes minutes on 2 cores.
CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_POLICY_VERSION_MINIMUM=3.5" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$venv/bin/python" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==$version"
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
echo "$version" > "$stamp"
