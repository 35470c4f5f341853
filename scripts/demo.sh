#!/usr/bin/env bash
# Quick start 1: set up .venv, run the demo recipe end to end (offline MiniLM + shipped SST-2 slice),
# then export the deployable pruned INT8 checkpoint to ONNX (token pruning and INT8 in the graph) and
# classify two sentences through ONNX Runtime, the fastest CPU path.
# Idempotent: a finished demo run is not redone (ltp-compress resumes after the last finished stage).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ltp-compress" run recipes/demo.yaml "$@"
ckpt=$(ls -d runs/demo/stages/*-int8/model 2>/dev/null | tail -n 1 || true)
if [ -n "$ckpt" ]; then
  "$VENV/bin/ltp-compress" export "$ckpt" runs/demo/onnx --parity-tsv data/sst2_demo/dev.tsv
  "$VENV/bin/ltp-compress" predict runs/demo/onnx "a gripping, beautifully acted film" "a dull and lifeless mess" --threads 2
fi
echo "demo report: runs/demo/report.md"
