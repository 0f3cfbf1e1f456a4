"""What the llama.cpp backend's key type costs: pass times at a long context and prompt reading,
with Q8_0 keys (the backend's, one attention path for every pass) against llama.cpp's default f16
keys (a split path for lone tokens past 512 cells of cache view, a tiled path for long prompts).

    python scripts/kv_paths.py [--threads N] [--rounds R]

Prints medians of interleaved rounds; docs/backends.md quotes them. A timing script, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from specdecode.models import default_gguf_path, gguf_tokenizer
from specdecode.runners.llamacpp import LlamaCppModel, LlamaCppRunner

KEY_TYPES = ("GGML_TYPE_Q8_0", "GGML_TYPE_F16")
DATASET = Path(__file__).resolve().parents[2] / "shared" / "specbench" / "question.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = default_gguf_path()
    tokenizer = gguf_tokenizer(path, "target")
    text = " ".join(json.loads(line)["turns"][0] for line in DATASET.read_text().splitlines())
    ids = tokenizer(text).input_ids
    model = LlamaCppModel(path, args.threads)
    runners = {}
    for key_type in KEY_TYPES:
        model.key_type = key_type
        runners[key_type] = LlamaCppRunner(model)

    context, sizes = 500, (1, 2, 4, 8)
    passes = {k: {n: [] for n in sizes} for k in KEY_TYPES}
    for key_type, runner in runners.items():
        runner.forward(ids[:context], num_logits=0)
    for _ in range(args.rounds * 5):
        for key_type, runner in runners.items():
            for n in sizes:
                t = time.perf_counter()
                runner.forward(ids[context:context + n], num_logits=n)
                passes[key_type][n].append(time.perf_counter() - t)
                runner.truncate(context)
    print(f"pass over n tokens after {context} cached, median ms ({model.threads} threads)")
    for key_type in KEY_TYPES:
        print(f"  {key_type[10:]:5s}", "  ".join(f"n={n}: {statistics.median(v) * 1000:.1f}"
                                                for n, v in passes[key_type].items()))

    prompts = {k: {n: [] for n in (512, 1024, 2048)} for k in KEY_TYPES}
    for _ in range(args.rounds):
        for n in (512, 1024, 2048):
            for key_type, runner in runners.items():
                runner.reset()
                t = time.perf_counter()
                runner.forward(ids[:n], num_logits=1)
                prompts[key_type][n].append(time.perf_counter() - t)
    print("reading a prompt of n tokens, median ms per token")
    for key_type in KEY_TYPES:
        print(f"  {key_type[10:]:5s}", "  ".join(f"n={n}: {statistics.median(v) / n * 1000:.2f}"
                                                for n, v in prompts[key_type].items()))


if __name__ == "__main__":
    main()
