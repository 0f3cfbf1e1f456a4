"""Pass-time curves of the default target on the three backends, measured in one process.

    python scripts/pass_curves.py [--context 128] [--rounds 7]

For each backend (torch: the lean fp32 runner; llamacpp: the Q4_1 file through llama.cpp; ik: the
same file through ik_llama.cpp, where it passes its start-up check; 1024: a prompt read in one call),
the median milliseconds of a pass over n = 1, 2, 3, 4, 5, 8, 16 new tokens after a ``context``-token
prefix, with logits for every position and the cache cut back after each pass (as verification
does). Sizes and backends alternate round by round, so a stall of the machine spoils one round.
Also prints each backend's resident memory after loading.
"""

import argparse
import resource
import statistics
import time

from specdecode.config import ConfigError
from specdecode.models import load_model
from specdecode.runners import make_runner

SIZES = (1, 2, 3, 4, 5, 8, 16, 1024)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    before = rss_mb()
    gguf = load_model(None, backend="llamacpp")
    llamacpp = make_runner(gguf.model)
    after_gguf = rss_mb()
    torch_target = load_model(None)
    lean = make_runner(torch_target.model)
    after_torch = rss_mb()
    print(f"resident memory: llamacpp +{after_gguf - before:.0f} MB (one context), "
          f"torch +{after_torch - after_gguf:.0f} MB")
    runners = {"torch lean fp32": lean, "llamacpp Q4_1 (flash attention)": llamacpp}
    try:
        ik = load_model(None, backend="ik")
        runners[f"ik Q4_1 (calls of <= {ik.model.max_block} tokens)"] = make_runner(ik.model)
    except ConfigError as exc:
        print(f"ik: {exc}")
    prefix = list(range(1000, 1000 + args.context))
    for r in runners.values():
        r.forward(prefix, 0)
    times = {name: {n: [] for n in SIZES} for name in runners}
    for _ in range(args.rounds):
        for n in SIZES:
            for name, r in runners.items():
                t = time.perf_counter()
                r.forward(list(range(2000, 2000 + n)), min(n, 16))
                times[name][n].append(time.perf_counter() - t)
                r.truncate(args.context)
    print("| backend | " + " | ".join(str(n) for n in SIZES) + " |")
    print("| --- |" + " --- |" * len(SIZES))
    for name in runners:
        row = [f"{1000 * statistics.median(times[name][n]):.1f}" if times[name][n] else "-" for n in SIZES]
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
