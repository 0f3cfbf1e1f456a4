#!/usr/bin/env bash
# The issue-25 load matrix: 1/4/16/32 concurrent streamed chat requests of 128 tokens (greedy,
# ignore_eos), prompts from a Spec-Bench-format file (DATA, default all of Spec-Bench).
#  1. our server on llama.cpp under the budget, batched plain decoding and batched fixed tau=3, and
#     llama-server -np 16 on the same GGUF file when its binary is given: all resident, measured in
#     ROUNDS interleaved rounds (default 3), medians reported (the machine is noisy);
#  2. the server as it was before batching (torch, one request at a time), once: it is ~5x slower;
#  3. with TORCH=1, our server on the torch backend, budget and plain, interleaved.
# Usage: [DATA=file.jsonl] [ROUNDS=3] [TORCH=1] [CONC=1,4,16,32] [MAX_TOKENS=128] scripts/loadtest_matrix.sh OUT [LLAMA_SERVER]
set -euo pipefail
OUT=${1:-out/loadtest}
LLAMA_SERVER=${2:-}
DATA=${DATA:-../shared/specbench/question.jsonl}
ROUNDS=${ROUNDS:-3}
COMMON=(--dataset "$DATA" --concurrency "${CONC:-1,4,16,32}" --max-tokens "${MAX_TOKENS:-128}" --no-progress)
Q="--queue-timeout 600"
servers=(--serve "budget=--max-batch 16 $Q" --serve "plain=--max-batch 16 --draft none $Q"
         --serve "fixed3=--max-batch 16 --policy fixed --draft-len 3 $Q")
pid=
if [ -n "$LLAMA_SERVER" ]; then
  GGUF=$(python -c "from specdecode.models import default_gguf_path as d; print(d())")
  # its defaults otherwise (the prompt cache per slot on, as ours keeps a slot's prefix)
  "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port 18080 -np 16 -c 65536 -t 2 -cram 0 --log-disable \
    > /dev/null 2>&1 &
  pid=$!
  trap 'kill $pid 2> /dev/null || true' EXIT
  for _ in $(seq 240); do curl -sf http://127.0.0.1:18080/health > /dev/null && break; sleep 0.5; done
  servers+=(--url "llama-server=http://127.0.0.1:18080")
fi
specdecode loadtest "${COMMON[@]}" --rounds "$ROUNDS" "${servers[@]}" --out "$OUT/interleaved" | tail -n +3
if [ -n "$pid" ]; then kill "$pid"; wait "$pid" || true; fi
specdecode loadtest "${COMMON[@]}" --serve "torch-one-at-a-time=--backend torch --max-batch 1 $Q" \
  --out "$OUT/one-at-a-time" | tail -n +3
if [ "${TORCH:-0}" = 1 ]; then
  specdecode loadtest "${COMMON[@]}" --rounds "$ROUNDS" --serve "torch-budget=--backend torch $Q" \
    --serve "torch-plain=--backend torch --draft none $Q" --out "$OUT/torch" | tail -n +3
fi
