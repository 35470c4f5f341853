#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that scripts/gpu_check.sh installs --no-deps
# on a CUDA machine without network whose image has torch, transformers, accelerate, tokenizers,
# safetensors, numpy, PyYAML, tqdm, matplotlib and pytest, but no pydantic (nor datasets).
#
#   bash scripts/gpu_wheels.sh            # -> .gpu_wheels/*.whl (git-ignored), ~2.5 MB
#
# What our check path imports that such an image lacks (read off the imports of pipeline/, stages/,
# modeling/, kernels/, tasks/): pydantic (recipe + stage + data configs). pydantic's own
# requirements: pydantic-core (the exact version pydantic pins), annotated-types,
# typing-inspection, typing-extensions (the image has one, maybe older than pydantic needs: ours
# shadows it). `datasets` is imported only by tasks/data.py::_read_hub (data.source: hub), which
# the check never uses; neural-compressor / torchao only by `ltp-compress bench` peers.
# Our own package is not a wheel: gpu_check.sh maps it with a folder of symlinks on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_wheels
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PYVER=${GPU_PYVER:-3.12}
lock() {  # version of a package in requirements-lock.txt (names compared case- and -/_-insensitively)
  local want; want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  awk -F'==' -v w="$want" '{n=tolower($1); gsub("_","-",n); if (n==w) {print $2; exit}}' requirements-lock.txt
}
PLAT=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64)
get() {  # get NAME VERSION
  echo "[gpu_wheels] $1==$2"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLAT[@]}" -d "$DEST" "$1==$2"
}
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
DEST="$DEST.tmp"
PYD=$(lock pydantic); [ -n "$PYD" ] || { echo "requirements-lock.txt has no pydantic pin" >&2; exit 1; }
get pydantic "$PYD"
# the pydantic-core version this pydantic requires (its METADATA pins it exactly)
CORE=$("$PY" - "$DEST" <<'PY'
import re, sys, zipfile, glob
whl = glob.glob(f"{sys.argv[1]}/pydantic-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
m = re.search(r"^Requires-Dist: pydantic[-_]core[ \t(]*==[ \t]*([0-9][^\s;),]*)", meta, re.M | re.I)
print(m.group(1) if m else "")
PY
)
[ -n "$CORE" ] || { echo "cannot read the pydantic-core pin from the pydantic wheel" >&2; exit 1; }
LOCKCORE=$(lock pydantic-core)
[ -z "$LOCKCORE" ] || [ "$LOCKCORE" = "$CORE" ] || echo "[gpu_wheels] note: lock has pydantic-core $LOCKCORE, pydantic $PYD requires $CORE: using $CORE"
get pydantic-core "$CORE"
for name in annotated-types typing-inspection typing-extensions; do
  v=$(lock "$name"); [ -n "$v" ] || { echo "requirements-lock.txt has no $name pin" >&2; exit 1; }
  get "$name" "$v"
done
rm -rf .gpu_wheels && mv "$DEST" .gpu_wheels
ls -l .gpu_wheels
du -sh .gpu_wheels
