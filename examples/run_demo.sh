#!/usr/bin/env bash
# Fit a controller on the bundled arithmetic examples with the embedded default model
# (SmolLM2-135M-Instruct), evaluate base vs controller on held-out examples, and generate.
# Smaller/larger runs:  GATES=512 STEPS=40 bash examples/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GATES=${GATES:-10000} STEPS=${STEPS:-60} LR=${LR:-2e-2} MAX_LOG_GATE=${MAX_LOG_GATE:-0.2}  # the defaults
OUT=${OUT:-runs/demo}
MODEL=${MODEL:+--model $MODEL}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false

echo "== 1/3 fit: $GATES gates, $STEPS steps, lr $LR, max-log-gate $MAX_LOG_GATE"
ntkmirror fit $MODEL --train examples/math_train.jsonl --out "$OUT/controller.safetensors" \
  --gates "$GATES" --steps "$STEPS" --lr "$LR" --max-log-gate "$MAX_LOG_GATE" --score-batches 4

echo "== 2/3 eval: base vs controller on held-out examples"
ntkmirror eval $MODEL --controller "$OUT/controller.safetensors" --eval examples/math_eval.jsonl

echo "== 3/3 generate"
for q in "Question: 47 + 36 = ?\nAnswer:" "Question: 58 + 67 = ?\nAnswer:"; do
  printf '%s' "$q" | sed 's/\\n/ | /'
  printf '  -> base:%s' "$(ntkmirror generate $MODEL --prompt "$q" --max-new-tokens 8 2>/dev/null | head -1)"
  printf '  controller:%s\n' "$(ntkmirror generate $MODEL --controller "$OUT/controller.safetensors" \
    --prompt "$q" --max-new-tokens 8 2>/dev/null | head -1)"
done
ntkmirror inspect --controllers "$OUT/controller.safetensors"
