#!/usr/bin/env bash
# End-to-end demo on the embedded default model, offline: generate → filter → analyze → train → evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
CF=.venv/bin/conceptfix
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"

echo "== stage 1: generate (offline bank)"
$CF generate --provider bank --n 400 --batches 1 --seed 0 -o "$OUT/medical_prompts.json" --overwrite
echo "== stage 2: filter"
$CF filter --input "$OUT/medical_prompts.json" --output "$OUT/filtered_prompts.json" --top-k 10 --overwrite
