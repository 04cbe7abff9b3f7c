#!/usr/bin/env bash
# End-to-end demo on the embedded default model (SmolLM2-135M-Instruct), offline, on CPU:
#   generate → filter → analyze → train → evaluate.
# Every stage is its own command writing files a person can open under $DEMO_DIR (default runs/demo).
# Re-running is cheap: each stage reuses its result when the inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
CF=.venv/bin/conceptfix
OUT=${DEMO_DIR:-runs/demo}
mkdir -p "$OUT"
PROMPT="The primary hormone regulating blood pressure is"

echo "== stage 1: generate — every prompt of the curated offline bank, checked by the seed's rules"
$CF generate --provider bank --all --seed 0 -o "$OUT/medical_prompts.json" --overwrite

echo "== stage 2: filter — content-word top-1 that is wrong, correct answer at rank 2-5"
$CF filter --input "$OUT/medical_prompts.json" --output "$OUT/filtered_prompts.json" --top-k 10 --overwrite

echo "== stage 3: analyze — RelP over MLP neurons for the seed's case (' al' vs ' ren')"
$CF analyze "$PROMPT" --contrastive " al" " ren" --tau 0.05 --output "$OUT/analysis_aldosterone" --no-llm
echo "   … and the first target the filter found, straight from its JSON"
$CF analyze --case "$OUT/filtered_prompts.json#0" --tau 0.05 --output "$OUT/analysis_case0" --no-llm

echo "== stage 6: train — SFT on four concept texts about aldosterone (no renin, no blood pressure)"
$CF train --config configs/sft_aldosterone.yaml --output-dir "$OUT/sft_aldosterone"

echo "== stage 7: evaluate — target, paraphrases, held-out facts (locality)"
$CF evaluate --config configs/sft_aldosterone.yaml --tuned "$OUT/sft_aldosterone" --output "$OUT/evaluation"

echo
echo "Done. Open:"
echo "  $OUT/filtered_prompts.json            target cases with top-k tables and the whole wrong word"
echo "  $OUT/analysis_aldosterone/graph.html  the attribution graph (offline, in any browser)"
echo "  $OUT/analysis_aldosterone/faithfulness.png"
echo "  $OUT/sft_aldosterone/loss.png         training loss"
echo "  $OUT/evaluation/                      before/after tables, probability_shift.png, evaluation.json"
