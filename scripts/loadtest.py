"""Bounded load test of a running `specdecode serve`: N concurrent greedy requests on loopback.

    python scripts/loadtest.py --base http://127.0.0.1:8000 --requests 32 --max-tokens 32
Prints throughput (completion tokens per second over the wall time) and p50/p95 latency.
"""

import argparse
import concurrent.futures
import statistics
import time

import httpx


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    prompts = [f"Write two sentences about the number {i}." for i in range(args.requests)]

    def ask(prompt):
        t = time.perf_counter()
        r = httpx.post(args.base + "/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens, "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
        results = list(pool.map(ask, prompts))
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    print(f"{args.requests} requests, {tokens} tokens in {wall:.1f} s: {tokens / wall:.1f} tok/s; "
          f"latency p50 {statistics.median(lat):.1f} s, p95 {lat[int(0.95 * (len(lat) - 1))]:.1f} s")


if __name__ == "__main__":
    main()
