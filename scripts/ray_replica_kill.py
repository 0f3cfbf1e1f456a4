"""The issue-26 failure case: `serve --ray --replicas 2 --threads 1` under a closed-loop load of
streamed chat requests (Spec-Bench prompts, 128 tokens), one replica killed mid-load. Prints how
every request ended and when the replacement answered.

Usage: python scripts/ray_replica_kill.py [--concurrency 32] [--requests 64] [--kill-after 30]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import httpx

from specdecode.loadtest import LoadSettings, run_loadtest
from specdecode.procs import free_port, start_server, stop_server
from specdecode.server.ray_serve import DEPLOYMENT, local_only_environment


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--kill-after", type=float, default=30.0)
    ap.add_argument("--dataset", default="../shared/specbench/question.jsonl")
    args = ap.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "specdecode", "serve", "--ray", "--replicas", "2", "--threads", "1",
                         "--port", str(port), "--max-batch", "16", "--queue-timeout", "600"], base, "serve",
                        timeout_s=600, name="specdecode serve --ray")
    try:
        _measure(args, base)
    except BaseException:
        import traceback

        traceback.print_exc()  # now: Ray ends this process once the server and its GCS are gone
        raise
    finally:
        stop_server(proc, grace_s=60)
    return 0


def _measure(args, base: str) -> None:
    local_only_environment()
    import ray

    ray.init(address="auto", logging_level="error")
    result = {}
    settings = LoadSettings({"ray-2x1": base}, args.dataset, (args.concurrency,), None, args.requests,
                            128).validate()
    load = threading.Thread(target=lambda: result.update(run_loadtest(settings, progress=False)))
    started = time.time()
    load.start()
    time.sleep(args.kill_after)
    prefix = f"SERVE_REPLICA::specdecode#{DEPLOYMENT}#"
    victim = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith(prefix))[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed = time.time()
    print(f"killed replica {victim} at {killed - started:.1f} s", flush=True)
    replaced = None
    while load.is_alive() or replaced is None:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}
        if replaced is None and len(names - {victim}) == 2:  # a new replica's actor exists ...
            try:  # ... and Serve counts two running
                if httpx.get(base + "/health", timeout=2).json().get("replicas") == 2:
                    replaced = time.time() - killed
            except httpx.HTTPError:
                pass
        load.join(1)
        if time.time() - killed > 600:
            break
    seen = "not seen" if replaced is None else f"answering {replaced:.1f} s after the kill"
    print(f"load ended at {time.time() - started:.1f} s; replacement {seen}")
    row = result["rows"][0]
    print(f"{row['requests']} requests, {row['failed']} failed (slowest failure after "
          f"{row['failed_within_s'] or 0:.1f} s): {row['error_counts']}; {row['throughput_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
