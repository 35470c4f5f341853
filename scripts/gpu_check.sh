#!/usr/bin/env bash
# GPU readiness check (issue 11 part 5): one script, <= 5 minutes on a CUDA machine, one JSON summary.
#
#   bash scripts/gpu_wheels.sh                      # once, where PyPI is reachable: .gpu_wheels/*.whl
#   bash scripts/gpu_check.sh                       # on the CUDA machine, from anywhere
#   GPU_CHECK_ALLOW_CPU=1 bash scripts/gpu_check.sh # dry run of every step on CPU, tiny sizes
#
# The target image has torch, transformers, accelerate, tokenizers, safetensors, numpy, PyYAML, tqdm,
# matplotlib and pytest, but no pydantic and no network: the wheels from scripts/gpu_wheels.sh are
# installed --no-deps into a private folder on PYTHONPATH (nothing in the image is changed). Our
# package is not installed: a folder of symlinks maps ltp_compress.{pipeline,stages,modeling,kernels,
# tasks} to the repo's top-level folders (what pyproject's package-dir does), so no build step,
# setuptools or write into the tree is needed.
#
# Steps (scripts/gpu_check.py; each in its own process with its own timeout, recorded even when it
# fails): env, pytest -m gpu, a bf16 run of a tiny recipe through accelerate launch, the CUDA INT8
# backend vs the reference, INT8 vs bf16 GEMMs at BERT-base shapes, pruned INT8 BERT-base vs bf16
# dense at bs 1 / 32. Summary: $OUT/gpu_check.json when $OUT is set, else gpu_check.json in the
# folder the script was started from.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 285), GPU_CHECK_WORK (scratch
# folder, default a new temp folder), GPU_CHECK_STEPS (comma list to run a subset).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export GPU_CHECK_CALLER_DIR="$PWD"  # the summary goes to $OUT, else here
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
SITE="$WORK/site"
PKG="$WORK/pkg"
SETUP_LOG="$WORK/setup.log"
: >"$SETUP_LOG"

# 1. missing third-party packages, from carried wheels (never from the network)
if ls "$REPO"/.gpu_wheels/*.whl >/dev/null 2>&1; then
  if ! "$PY" -c "import pydantic, pydantic_core" >/dev/null 2>&1 || [ "${GPU_CHECK_FORCE_WHEELS:-0}" = 1 ]; then
    echo "[gpu_check] installing $(ls "$REPO"/.gpu_wheels/*.whl | wc -l) wheels --no-deps into $SITE" | tee -a "$SETUP_LOG"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$SITE" "$REPO"/.gpu_wheels/*.whl >>"$SETUP_LOG" 2>&1 \
      || echo "[gpu_check] pip install of .gpu_wheels failed (see setup log in the summary)" | tee -a "$SETUP_LOG"
  else
    echo "[gpu_check] pydantic already importable: wheels not installed" | tee -a "$SETUP_LOG"
  fi
else
  echo "[gpu_check] no .gpu_wheels/*.whl (run scripts/gpu_wheels.sh where PyPI is reachable, carry .gpu_wheels)" | tee -a "$SETUP_LOG"
fi

# 2. our package as a symlink tree (pyproject: ltp_compress.X lives in the top-level folder X)
rm -rf "$PKG" && mkdir -p "$PKG/ltp_compress"
for f in "$REPO"/ltp_compress/*.py; do ln -s "$f" "$PKG/ltp_compress/$(basename "$f")"; done
for d in pipeline stages modeling kernels tasks; do ln -s "$REPO/$d" "$PKG/ltp_compress/$d"; done
export PYTHONPATH="$PKG${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
# `python -m X` puts the current folder first on sys.path: never let the repo root (its plain
# ltp_compress/ folder has no subpackages) shadow the symlink tree. Python >= 3.11.
export PYTHONSAFEPATH=1

cd "$WORK" || exit 1
exec "$PY" "$REPO/scripts/gpu_check.py" --work "$WORK" --setup-log "$SETUP_LOG" "$@"
