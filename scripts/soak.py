"""A soak of `specdecode serve` on 127.0.0.1: many requests, prompts up to the slot context,
clients that leave before sending their headers, mid-prompt and mid-stream; then the server must
still answer correctly, its gauges be back at zero and its resident memory flat. With
``--sigterm``, a last wave of requests is in flight when the server gets SIGTERM: each must end
(complete or a clear error) and the process exit within its grace period (the fault run).

    python scripts/soak.py [--requests 1000] [--concurrency 16] [--slot-context 2048] [-- SERVE OPTIONS]
    python scripts/soak.py --requests 300 --concurrency 64 --sigterm      # the fault run

It starts its own server (``specdecode serve --port P`` plus the options after ``--``; the
default backend is ``auto``), sends ``--requests`` requests from ``--concurrency`` clients, every
one bounded in time, and prints what happened to them, the server's RSS at the start, the middle
and the end, and the checks. Not part of the test suite: it takes minutes. Exit code 1 when a
check fails.
"""

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx

from specdecode.procs import free_port, start_server, stop_server

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gauges(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=30).text
    out = {}
    for name in GAUGES:
        values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        out[name] = sum(values) if values else float("nan")  # nan: the series is missing, a failure
    return out


def prompts(dataset: str, tokens_max: int) -> list[str]:
    """Spec-Bench first turns, and longer prompts made of several of them up to about
    ``tokens_max`` tokens (at ~4 characters a token), so that prompts reach the slot context."""
    turns = [json.loads(line)["turns"][0] for line in open(dataset) if line.strip()]
    rng = random.Random(0)
    long = []
    for _ in range(40):
        text, budget = [], rng.randint(tokens_max // 4, int(tokens_max * 0.8)) * 4
        while sum(map(len, text)) < budget:
            text.append(rng.choice(turns))
        long.append("\n\n".join(text)[:budget] + "\n\nSummarize the above in one sentence.")
    return turns + long


async def leave_before_headers(base: str) -> str:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    return "left before headers"


async def one(client: httpx.AsyncClient, base: str, prompt: str, kind: str, rng: random.Random) -> str:
    if kind == "cancel_headers":
        return await leave_before_headers(base)
    body = {"model": "soak", "messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(4, 48),
            "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 1000), "stream": kind != "plain"}
    try:
        if kind == "plain":
            r = await client.post(base + "/v1/chat/completions", json=body, timeout=300)
            return "ok" if r.status_code == 200 else f"http {r.status_code}"
        async with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                return f"http {r.status_code}"
            if kind == "cancel_prompt":  # leave while the prompt is being read: before the first chunk
                return "left mid-prompt"
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks += 1
                    if kind == "cancel_stream" and chunks >= 2:
                        return "left mid-stream"
            return "ok"
    except httpx.HTTPError as exc:
        return f"client error {type(exc).__name__}"


async def soak(base: str, pid: int, args) -> dict:
    pool = prompts(args.dataset, args.slot_context - 64)
    rng = random.Random(1)
    kinds = rng.choices(["plain", "stream", "cancel_headers", "cancel_prompt", "cancel_stream"],
                        weights=[8, 8, 1, 2, 2], k=args.requests)
    results: dict[str, int] = {}
    rss = {"start": rss_mb(pid)}
    queue: asyncio.Queue = asyncio.Queue()
    for i, kind in enumerate(kinds):
        queue.put_nowait((i, kind))
    t0 = time.time()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        async def worker():
            while not queue.empty():
                i, kind = queue.get_nowait()
                outcome = await one(client, base, rng.choice(pool), kind, rng)
                results[outcome] = results.get(outcome, 0) + 1
                if i == args.requests // 2:
                    rss["middle"] = rss_mb(pid)
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.time() - t0
    for _ in range(600):  # requests whose clients left may still be finishing: wait for the gauges
        g = gauges(base)
        if all(v == 0 for v in g.values()):
            break
        await asyncio.sleep(0.5)
    rss["end"] = rss_mb(pid)
    return {"results": results, "seconds": round(elapsed, 1), "rss_mb": {k: round(v) for k, v in rss.items()},
            "gauges_after": g}


async def sigterm_wave(base: str, proc, args) -> dict:
    """``args.concurrency`` streamed requests sent, SIGTERM once as many as run at once (16, the
    default batch) have their first chunk or an answer, the rest queued; how each ended and how
    long the process took to exit."""
    import signal

    results: dict[str, int] = {}
    started = asyncio.Event()
    firsts = 0

    async def streamed(client, i):
        nonlocal firsts
        body = {"model": "soak", "messages": [{"role": "user", "content": f"Tell a long story, number {i}."}],
                "max_tokens": 400, "temperature": 0, "stream": True}
        outcome = "ended without [DONE]"
        try:
            async with client.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    outcome = f"http {r.status_code}"
                else:
                    first = True
                    async for line in r.aiter_lines():
                        if first and line.startswith("data: "):
                            first, firsts = False, firsts + 1
                            if firsts >= min(args.concurrency, 16):
                                started.set()
                        if line.startswith('data: {"error"'):
                            outcome = "cut, 503 in the stream"
                        elif line == "data: [DONE]" and outcome != "cut, 503 in the stream":
                            outcome = "completed"
        except httpx.HTTPError as exc:
            outcome = f"connection closed ({type(exc).__name__})"
        finally:
            if outcome.startswith("http"):
                firsts += 1
                if firsts >= min(args.concurrency, 16):
                    started.set()
        results[outcome] = results.get(outcome, 0) + 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        tasks = [asyncio.create_task(streamed(client, i)) for i in range(args.concurrency)]
        await asyncio.wait_for(started.wait(), 600)
        t = time.time()
        proc.send_signal(signal.SIGTERM)
        done, pending = await asyncio.wait(tasks, timeout=args.grace + 30)
        while proc.poll() is None and time.time() - t < args.grace + 30:
            await asyncio.sleep(0.05)
        exit_s = time.time() - t
    return {"results": results, "unended": len(pending), "exit_s": round(exit_s, 2), "exit_code": proc.poll()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--slot-context", type=int, default=2048)
    p.add_argument("--dataset", default="../shared/specbench/question.jsonl")
    p.add_argument("--sigterm", action="store_true", help="end with SIGTERM while a wave of requests runs")
    p.add_argument("--grace", type=float, default=5.0, help="the server's --shutdown-grace (default: 5)")
    args, serve = p.parse_known_args()
    serve = [a for a in serve if a != "--"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "specdecode", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model-name", "soak", "--slot-context", str(args.slot_context), "--shutdown-grace", str(args.grace),
               "--max-queue", str(max(64, args.concurrency)), *serve]
    proc = start_server(command, base, "soak")
    try:
        before = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "model": "soak", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16,
            "temperature": 0}).json()["choices"][0]["message"]["content"]
        report = asyncio.run(soak(base, proc.pid, args))
        after = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "model": "soak", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16,
            "temperature": 0}).json()["choices"][0]["message"]["content"]
        alive = proc.poll() is None
        if args.sigterm:
            report["sigterm"] = asyncio.run(sigterm_wave(base, proc, args))
    finally:
        stop_server(proc)
    rss = report["rss_mb"]
    checks = {
        "server alive after the soak": alive,
        "no 5xx": not any(k.startswith("http 5") for k in report["results"]),
        "gauges back at zero": all(v == 0 for v in report["gauges_after"].values()),
        "same greedy answer before and after": before == after,
        "RSS flat (end within 10% of the middle)": rss["end"] <= rss.get("middle", rss["end"]) * 1.10,
    }
    if args.sigterm:
        wave = report["sigterm"]
        checks["every request in flight at SIGTERM ended"] = wave["unended"] == 0
        checks["the SIGTERM wave: completed, or 503 (queued, or cut at the grace's end)"] = set(wave["results"]) <= {
            "completed", "http 503", "cut, 503 in the stream"}
        checks[f"exit within the grace period ({args.grace:g} s + 2 s)"] = wave["exit_s"] <= args.grace + 2
    print(json.dumps({**report, "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
