"""Slow clients against `specdecode serve`: request bodies that stall after their headers, and an
idle keep-alive connection.

    python scripts/slow_clients.py [--stalled 50] [--body-timeout 3] [--keep-alive-timeout 2] [-- SERVE OPTIONS]
    python scripts/slow_clients.py -- --ray --replicas 1      # the same through Ray Serve's proxy

Starts its own server on 127.0.0.1 with the two timeouts, times a whole 2-token request alone,
then opens ``--stalled`` connections that send their headers and a part of the body and nothing
more, times the same request while they stall, and waits for each stalled one to be answered and
closed. Prints the request's latency alone and during the stall (medians of 5), the statuses the
stalled ones got, when the last of them was closed (after the first was opened), and how long an
idle kept-alive connection stayed open. Not part of the test suite (the tests check the same
behaviour by events, not times).
"""

import argparse
import json
import socket
import statistics
import sys
import time

import httpx

from specdecode.config import DEFAULT_TARGET_NAME
from specdecode.procs import free_port, start_server, stop_server


def _open(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=300)  # the bound of a wait on the server
    sock.sendall(data)
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--stalled", type=int, default=50)
    p.add_argument("--body-timeout", type=float, default=3.0)
    p.add_argument("--keep-alive-timeout", type=float, default=2.0)
    args, serve = p.parse_known_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "specdecode", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--body-timeout", str(args.body_timeout), "--keep-alive-timeout", str(args.keep_alive_timeout),
               *[a for a in serve if a != "--"]]
    proc = start_server(command, base, "slow_clients")
    body = json.dumps({"model": DEFAULT_TARGET_NAME, "prompt": "The three primary colors are", "max_tokens": 2,
                       "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    def latencies(http: httpx.Client) -> list[float]:
        out = []
        for _ in range(5):
            t = time.perf_counter()
            r = http.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"})
            out.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise SystemExit(f"a whole request got {r.status_code}: {r.text[:200]}")
        return out

    try:
        with httpx.Client(timeout=300) as http:
            alone = latencies(http)
            opened = time.perf_counter()
            stalled = [_open(port, head + body[:10]) for _ in range(args.stalled)]
            during = latencies(http)
        statuses, last = [], 0.0
        for sock in stalled:
            reply = _until_closed(sock)
            last = time.perf_counter() - opened
            statuses.append(reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "nothing")
        t = time.perf_counter()
        idle = _until_closed(_open(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        idle_s = time.perf_counter() - t
    finally:
        stop_server(proc)
    print(f"a 2-token request alone: median {1000 * statistics.median(alone):.1f} ms; while {args.stalled} bodies "
          f"stall: median {1000 * statistics.median(during):.1f} ms, max {1000 * max(during):.1f} ms")
    print(f"stalled bodies answered: {dict((s, statuses.count(s)) for s in sorted(set(statuses)))}, the last closed "
          f"{last:.2f} s after the first was opened (body timeout {args.body_timeout:g} s)")
    print(f"an idle kept-alive connection ({idle[:12].decode(errors='replace')}...) was closed after {idle_s:.2f} s "
          f"(keep-alive timeout {args.keep_alive_timeout:g} s)")
    return 0 if set(statuses) == {"408"} else 1


if __name__ == "__main__":
    sys.exit(main())
