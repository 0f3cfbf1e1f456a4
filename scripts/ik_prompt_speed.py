"""Prompt reading on ik_llama.cpp by call length and kernel choice, measured in one process.

    python scripts/ik_prompt_speed.py [--gguf FILE] [--prompt 1024] [--rounds 5] [--threads N]

Needs our build (ik/build.py: patch 0004 makes the kernel choice settable). For each setting, the
median tokens per second of reading a ``--prompt``-token prompt of random ids in llama_decode calls
of ``call`` tokens, logits for the last position only, the cache cleared before each read; the
settings alternate round by round, so a stall of the machine spoils one round, not one setting.
Kernel choice (``iqk_set_repack_min_rows``): "ik" is ik's own (products of 32+ rows repack the
weights, Q6_K 64+), "never" is the batch-invariant mode the ik backend runs (every product on its
weight type's own kernel), "always" repacks every product the weight type can repack. Then the
median milliseconds of a pass over n = 1, 8, 16 new tokens after the prompt, for "never" and "ik".
"""

import argparse
import statistics
import time

import torch

from specdecode.models import default_gguf_path
from specdecode.runners import ik_api
from specdecode.runners.ik import IkModel
from specdecode.runners.llamacpp import LlamaCppRunner

MODES = {"ik": 0, "never": ik_api.NEVER_REPACK, "always": 1}
SETTINGS = [("ik", 31), ("never", 31), ("never", 64), ("never", 128), ("never", 512),
            ("ik", 64), ("ik", 128), ("ik", 512), ("always", 512)]
PASSES = (1, 8, 16)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", default=None, help="a GGUF file (default: the default target's)")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    lib = ik_api.load()
    if lib.iqk_set_repack_min_rows is None:
        raise SystemExit(f"needs our build of ik_llama.cpp (python ik/build.py); in use: {ik_api.describe()}")
    path = args.gguf or default_gguf_path()
    model = IkModel(path, threads=args.threads, context=args.prompt + 64, max_block=512)
    runner = LlamaCppRunner(model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (args.prompt,), generator=generator).tolist()
    print(f"{path}, {args.prompt}-token prompt, {model.threads} threads; {ik_api.describe()}")
    print(lib.llama_print_system_info().decode())
    speeds = {setting: [] for setting in SETTINGS}
    passes = {(mode, n): [] for mode in ("never", "ik") for n in PASSES}
    for _ in range(args.rounds):
        for mode, call in SETTINGS:
            lib.iqk_set_repack_min_rows(MODES[mode])
            model.max_block = call
            runner.reset()
            t = time.perf_counter()
            runner.forward(ids, 1)
            speeds[(mode, call)].append(args.prompt / (time.perf_counter() - t))
        for mode in ("never", "ik"):
            lib.iqk_set_repack_min_rows(MODES[mode])
            for n in PASSES:
                t = time.perf_counter()
                runner.forward(ids[:n], n)
                passes[(mode, n)].append((time.perf_counter() - t) * 1e3)
                runner.truncate(args.prompt)
    lib.iqk_set_repack_min_rows(ik_api.NEVER_REPACK)
    base = statistics.median(speeds[("ik", 31)])
    print("| kernels | call | prompt tok/s (median) | vs ik's calls of 31 |")
    print("| --- | --- | --- | --- |")
    for (mode, call), values in speeds.items():
        median = statistics.median(values)
        print(f"| {mode} | {call} | {median:.0f} ({min(values):.0f}-{max(values):.0f}) | {median / base:.2f}x |")
    print("| kernels | " + " | ".join(f"T({n}) ms" for n in PASSES) + " |")
    for mode in ("never", "ik"):
        print(f"| {mode} | " + " | ".join(f"{statistics.median(passes[(mode, n)]):.2f}" for n in PASSES) + " |")


if __name__ == "__main__":
    main()
