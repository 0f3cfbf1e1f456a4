#!/usr/bin/env bash
# The issue-25 load matrix: our server under its policies on both backends, one at a time, and
# llama-server on the same GGUF file, each alone on the machine, 1/4/16/32 concurrent streamed chat
# requests of 128 tokens (greedy, ignore_eos), prompts from a Spec-Bench-format file (DATA, default
# all of Spec-Bench). Usage: [DATA=file.jsonl] scripts/loadtest_matrix.sh OUT [LLAMA_SERVER]
set -euo pipefail
OUT=${1:-out/loadtest}
LLAMA_SERVER=${2:-}
DATA=${DATA:-../shared/specbench/question.jsonl}
COMMON=(--dataset "$DATA" --concurrency 1,4,16,32 --max-tokens 128 --no-progress)
run() {  # name, then serve options
  local name=$1; shift
  specdecode loadtest "${COMMON[@]}" --serve-args "$*" --out "$OUT/$name" | tail -n +3 | sed "s/| specdecode |/| $name |/"
}
Q="--queue-timeout 600"
run budget --max-batch 16 $Q
run plain --max-batch 16 --draft none $Q
run fixed3 --max-batch 16 --policy fixed --draft-len 3 $Q
run torch-budget --backend torch $Q
run torch-plain --backend torch --draft none $Q
run torch-one-at-a-time --backend torch --max-batch 1 $Q  # the server before batching
if [ -n "$LLAMA_SERVER" ]; then
  GGUF=$(python -c "from specdecode.models import default_gguf_path as d; print(d())")
  for spec in none ngram-simple; do
    "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port 18080 -np 16 -c 65536 -t 2 --spec-type "$spec" --no-cache-prompt -cram 0 \
      --log-disable > /dev/null 2>&1 &
    pid=$!
    until curl -sf http://127.0.0.1:18080/health > /dev/null; do sleep 0.5; done
    specdecode loadtest "${COMMON[@]}" --url "llama-server-$spec=http://127.0.0.1:18080" --out "$OUT/llama-server-$spec" \
      | tail -n +3
    kill $pid; wait $pid || true
  done
fi
