"""How long /health takes while the server is handed work that could stall its event loop: a
megabyte prompt of one word on /v1/completions and /v1/chat/completions, again and again.

    python scripts/health_during.py [--rounds 10] [-- SERVE OPTIONS]

Starts its own `specdecode serve` on 127.0.0.1, sends ``--rounds`` such requests one after another
from a thread while the main thread times /health in a loop, and prints the median and largest
/health latency during them and the statuses the large requests got.
"""

import argparse
import statistics
import sys
import threading
import time

import httpx

from specdecode.procs import free_port, start_server, stop_server


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    args, serve = p.parse_known_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "specdecode", "serve", "--host", "127.0.0.1", "--port", str(port),
               *[a for a in serve if a != "--"]]
    proc = start_server(command, base, "health_during")
    word = "x" * 1_000_000
    statuses: list[int] = []
    done = threading.Event()

    def load():
        with httpx.Client(timeout=120) as http:
            for i in range(args.rounds):
                path, body = (("/v1/completions", {"prompt": word}) if i % 2 == 0 else
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": word}]}))
                statuses.append(http.post(base + path, json={"max_tokens": 1, **body}).status_code)
        done.set()

    latencies = []
    try:
        threading.Thread(target=load, daemon=True).start()
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                t = time.perf_counter()
                http.get(base + "/health")
                latencies.append(time.perf_counter() - t)
    finally:
        stop_server(proc)
    print(f"{args.rounds} one-word 1 MB requests, statuses {sorted(set(statuses))}; /health during them: "
          f"{len(latencies)} calls, median {1000 * statistics.median(latencies):.1f} ms, "
          f"max {1000 * max(latencies):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
