"""Seconds from launching ``specdecode generate`` to its first byte of answer, and to its exit.

    python scripts/first_token.py [--runs 5] [-- extra generate options]

Each run is a fresh process (the tokenizer's one-time conversion cached before the first run);
prints every run and the medians. docs/backends.md quotes them. A timing script, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def one_run(argv: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = proc.stdout.read(1)
    first_at = time.perf_counter() - start
    proc.stdout.read()
    proc.wait()
    if not first or proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode})")
    return first_at, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("extra", nargs="*", help="options passed to specdecode generate")
    args = ap.parse_args()
    exe = shutil.which("specdecode") or sys.exit("specdecode is not on PATH")
    argv = [exe, "generate", "Name three colours.", "--max-new-tokens", "32", *args.extra]
    one_run(argv)  # warm-up: caches, page cache
    runs = [one_run(argv) for _ in range(args.runs)]
    for first, total in runs:
        print(f"first byte {first:.2f} s, exit {total:.2f} s")
    print(f"median: first byte {statistics.median(r[0] for r in runs):.2f} s, "
          f"exit {statistics.median(r[1] for r in runs):.2f} s ({' '.join(argv[1:])})")


if __name__ == "__main__":
    main()
