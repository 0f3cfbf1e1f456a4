#!/usr/bin/env bash
# The issue-26 comparison: direct serving against Ray Serve with 1 replica of 2 threads and 2
# replicas of 1 thread, each alone on the machine (Ray clusters apart), 1/16/32 concurrent
# streamed chat requests of 128 tokens (greedy, ignore_eos), prompts from Spec-Bench.
# Usage: scripts/loadtest_ray.sh OUT
set -euo pipefail
OUT=${1:-out/loadtest-ray}
DATA=../shared/specbench/question.jsonl
COMMON=(--dataset "$DATA" --concurrency 1,16,32 --max-tokens 128 --no-progress)
S="--max-batch 16 --queue-timeout 600"
run() {  # name, then serve options
  local name=$1; shift
  specdecode loadtest "${COMMON[@]}" --serve "$name=$*" --out "$OUT/$name" | tail -n +3
}
run direct $S --threads 2
run ray-1x2 $S --ray --replicas 1 --threads 2
run ray-2x1 $S --ray --replicas 2 --threads 1
