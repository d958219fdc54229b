#!/usr/bin/env bash
# Installs LLaMA-Factory (PyPI `llamafactory`) into its own venv (.venv-llamafactory) for bench/bench_peer.py;
# quick when already installed (a stamp records the version). Its own venv because it pins its own
# transformers/peft/datasets range, which need not match glmtune's.
# torch goes in FIRST so pip keeps the CPU build instead of pulling a multi-GB CUDA one for llamafactory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
version="${LLAMAFACTORY_VERSION:-}"
venv="${LLAMAFACTORY_VENV:-.venv-llamafactory}"
stamp="$venv/.glmtune-llamafactory"
want="${version:-latest}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import llamafactory" 2>/dev/null; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q "llamafactory${version:+==$version}" "torch==2.13.0"
# llamafactory imports torchaudio (and transformers torchvision) unconditionally, and the registry's newest
# torchaudio/torchvision wheels are built for torch 2.11 (their compiled ops fail to load under 2.13:
# "operator torchvision::nms does not exist", "Could not load this library: .../_torchaudio.so"). So the peer
# gets the matching trio; PyPI has only the CUDA build of torch 2.11 (about 4 GB with its nvidia-* wheels,
# download.pytorch.org's CPU builds are not reachable here); it runs on the CPU all the same.
if ! "$venv/bin/python" -c "import torchaudio, torchvision" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
fi
"$venv/bin/python" -c "import llamafactory, transformers; print('llamafactory', llamafactory.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
