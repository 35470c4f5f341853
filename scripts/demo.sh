#!/usr/bin/env bash
# Quick start 1: set up .venv, run the demo recipe end to end (offline MiniLM + shipped SST-2 slice),
# then classify two sentences with the deployable pruned INT8 checkpoint it produced.
# Idempotent: a finished demo run is not redone (ltp-compress resumes after the last finished stage).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ltp-compress" run recipes/demo.yaml "$@"
ckpt=$(ls -d runs/demo/stages/*-int8/model 2>/dev/null | tail -n 1 || true)
if [ -n "$ckpt" ]; then
  "$VENV/bin/ltp-compress" predict "$ckpt" "a gripping, beautifully acted film" "a dull and lifeless mess"
fi
echo "demo report: runs/demo/report.md"
