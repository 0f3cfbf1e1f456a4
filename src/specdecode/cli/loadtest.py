"""``specdecode loadtest``: load OpenAI-compatible servers on loopback; table, results.json, plot."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import replace

from ..config import SpecDecodeError
from ..procs import free_port, start_server, stop_server


def register(sub) -> None:
    p = sub.add_parser("loadtest", help="a bounded load on OpenAI-compatible servers on 127.0.0.1")
    p.add_argument("--dataset", required=True, help="Spec-Bench-format question.jsonl (first turns are the prompts)")
    p.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                   help="a server to load, e.g. llama-server=http://127.0.0.1:8080 (repeatable); none given: "
                        "start `specdecode serve` with --serve-args and load it")
    p.add_argument("--serve-args", default="", help="options for the server started when no --url is given")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="requests per second (Poisson) instead of concurrency")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per load (default: twice the concurrency, at least 8)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--stop-at-eos", action="store_true", help="let requests end at end-of-sequence")
    p.add_argument("--out", default="out/loadtest")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _servers(urls: list[str]) -> dict[str, str]:
    out = {}
    for item in urls:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise SpecDecodeError("url", f"must be NAME=URL (got {item!r})")
        out[name] = url.rstrip("/")
    return out


def _start_own(serve_args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "specdecode", "serve", "--host", "127.0.0.1", "--port", str(port),
           *shlex.split(serve_args)]
    base = f"http://127.0.0.1:{port}"
    return start_server(cmd, base, "serve_args", name="specdecode serve"), base


def run(args) -> int:
    from ..loadtest import LoadSettings, format_table, run_loadtest, write_results

    try:
        concurrencies = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise SpecDecodeError("concurrency", f"must be comma-separated integers (got {args.concurrency!r})") from None
    servers, proc = _servers(args.url), None
    settings = LoadSettings(servers or {"specdecode": "http://127.0.0.1:1"}, args.dataset, concurrencies, args.rate,
                            args.requests, args.max_tokens, not args.stop_at_eos).validate()
    if not servers:
        proc, base = _start_own(args.serve_args)
        settings = replace(settings, servers={"specdecode": base})
    try:
        result = run_loadtest(settings, progress=not args.no_progress)
    finally:
        if proc is not None:
            stop_server(proc)
    print(format_table(result))
    for path in write_results(result, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0
