#!/usr/bin/env bash
# The prepared device check (issue 11): proves the GPU path on one GPU in under 8 minutes, from a copy of the
# repository, downloading nothing. Steps: (1) the `gpu`-marked tests, then bench/gpu_check.py: (2) our
# int8/int4 CUDA kernels vs torch at ChatGLM-6B shapes, (3) peak memory of one LoRA / ptv2 step on
# fp16/int8/int4 bases vs on-paper figures, (4) LoRA bf16 training tokens/s and MFU, (5) serving fp16/int4
# batch-1 vs 32-stream decode and TTFT. The table is appended to bench/RESULTS.md.
#
#   bench/gpu_check.sh --download-wheels .whl   # here, with a package registry: the wheels the GPU machine
#                                               # lacks (pydantic, fastapi, uvicorn, cpm_kernels, ...), ~18 MB
#   bench/gpu_check.sh --wheels .whl            # on the GPU machine (installs them offline, then runs)
#   bench/gpu_check.sh --cpu-smoke              # the same steps on a tiny model on the CPU (< 5 minutes)
#
# Options: --results FILE appends there instead of bench/RESULTS.md; --skip-tests skips step 1.
# Exit status: 0 when every step passed (in smoke mode: ran), 1 otherwise.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi

# What the GPU machine lacks (its image has torch, numpy, httpx, anyio, click, h11, prometheus-client, pytest,
# sentencepiece, safetensors, tokenizers, pyyaml): versions this repository is tested with (requirements/).
WHEELS=(
  "pydantic==2.14.3" "pydantic-core==2.50.4" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "fastapi==0.165.0" "starlette==1.10.0" "annotated-doc==0.0.7" "uvicorn==0.54.0"
  "opentelemetry-api==1.45.2" "transformers==5.23.0" "peft==0.21.2" "cpm-kernels==1.0.11" "setuptools==81.0.0"
)

mode="gpu" wheels="" results="" skip_tests=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) mode="smoke" ;;
    --wheels) wheels="$2"; shift ;;
    --download-wheels) mode="download"; wheels="$2"; shift ;;
    --results) results="$2"; shift ;;
    --skip-tests) skip_tests=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = "download" ]; then
  mkdir -p "$wheels"
  # Linux x86-64, CPython 3.12: the GPU machine's platform, whatever this machine is.
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$wheels" "${WHEELS[@]}"
  echo "gpu_check.sh: wheels in $wheels; on the GPU machine run: bench/gpu_check.sh --wheels $wheels"
  exit 0
fi

if [ -n "$wheels" ]; then
  site="$(mktemp -d)/site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    --find-links "$wheels" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout itself, not an installed copy: the check runs from a copy of the repository.
export PYTHONPATH="$root:$root/inference:$root/trainer${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

args=()
[ -n "$results" ] && args+=(--results "$results")
if [ "$mode" = "smoke" ]; then
  args+=(--device cpu --size tiny)
  # The CPU half of the same device tests (the gpu half needs CUDA): placement and host reads per step.
  tests=(tests/inference/test_device_placement.py -k "cpu and (live_on or copies_only)")
else
  args+=(--device cuda --size 6b)
  # Only the files that hold gpu tests: collecting the whole suite would import what the GPU machine lacks
  # (kopf, moto, deepspeed, ...) and fail on collection errors that say nothing about the GPU.
  mapfile -t gpu_files < <(cd "$root" && grep -rlE "pytest\.mark\.gpu|marks=\[?pytest\.mark\.gpu" tests \
    --include='test_*.py' | sort)
  tests=(-m gpu "${gpu_files[@]}")
fi

summary="skipped" rc=0
if [ "$skip_tests" = 0 ]; then
  log="$(mktemp)"
  set +e
  (cd "$root" && "$python" -m pytest -q -p no:cacheprovider -p no:randomly "${tests[@]}") 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  summary="$(grep -E '[0-9]+ (passed|failed|skipped|error|deselected)' "$log" | tail -1 | tr -d '=' | xargs)"
  rm -f "$log"
fi
cd "$root"
exec "$python" bench/gpu_check.py "${args[@]}" --tests "${summary:-no summary}" --tests-rc "$rc"
