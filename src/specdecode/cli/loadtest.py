"""``specdecode loadtest``: load OpenAI-compatible servers on loopback; table, results.json, plot."""

from __future__ import annotations

import os
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
                   help="a running server to load, e.g. llama-server=http://127.0.0.1:8080 (repeatable)")
    p.add_argument("--serve", action="append", default=[], metavar="NAME=OPTIONS",
                   help="start `specdecode serve OPTIONS` and load it as NAME, e.g. plain='--draft none' "
                        "(repeatable; all are started, one after another, before the load begins)")
    p.add_argument("--llama-server", action="append", default=[], metavar="NAME=BINARY [OPTIONS]",
                   help="start a llama-server and load it as NAME: BINARY is its path, or ik for ik_llama.cpp's "
                        "from our build (make setup); -m (the default target's file unless OPTIONS give one), "
                        "--host 127.0.0.1 and --port are added, e.g. ik16='ik -np 16 -c 32768 -fa off --log-disable' "
                        "(repeatable)")
    p.add_argument("--serve-args", default=None,
                   help="with neither --url nor --serve: the options of the one server started (as 'specdecode')")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts (default: %(default)s)")
    p.add_argument("--rate", type=float, default=None, help="requests per second (Poisson) instead of concurrency")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per load (default: twice the concurrency, at least 8)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each load this many times per server, the servers interleaved; rows give "
                        "the median (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens each request asks for")
    p.add_argument("--stop-at-eos", action="store_true", help="let requests end at end-of-sequence")
    p.add_argument("--out", default="out/loadtest", help="directory for results.json, table.md and the plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _named(items: list[str], param: str, what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SpecDecodeError(param, f"must be NAME={what} (got {item!r})")
        if name in out:
            raise SpecDecodeError(param, f"names a server twice: {name!r}")
        out[name] = value
    return out


def _start_own(serve_args: str, param: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "specdecode", "serve", "--host", "127.0.0.1", "--port", str(port),
           *shlex.split(serve_args)]
    base = f"http://127.0.0.1:{port}"
    return start_server(cmd, base, param, name="specdecode serve"), base


def _start_llama_server(value: str, param: str) -> tuple[subprocess.Popen, str]:
    """``BINARY [OPTIONS]`` started on a free loopback port (``--llama-server``)."""
    words = shlex.split(value)
    if not words:
        raise SpecDecodeError(param, "must be NAME=BINARY [OPTIONS], BINARY a path or ik")
    binary, options = words[0], words[1:]
    if binary == "ik":
        from ..runners.ik_api import server_binary

        found = server_binary()
        if found is None:
            raise SpecDecodeError(param, "ik: no llama-server in the ik_llama.cpp build in use (make setup builds one)")
        binary = str(found)
    elif not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        raise SpecDecodeError(param, f"not an executable file: {binary}")
    if not {"-m", "--model"} & set(options):
        from ..models import default_gguf_path

        options = ["-m", str(default_gguf_path()), *options]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [binary, *options, "--host", "127.0.0.1", "--port", str(port)]
    return start_server(command, base, param, quiet=True, name=os.path.basename(binary)), base


def run(args) -> int:
    from ..loadtest import LoadSettings, format_table, run_loadtest, write_results

    try:
        concurrencies = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    except ValueError:
        raise SpecDecodeError("concurrency", f"must be comma-separated integers (got {args.concurrency!r})") from None
    urls = {name: url.rstrip("/") for name, url in _named(args.url, "url", "URL").items()}
    own = _named(args.serve, "serve", "OPTIONS")
    servers = _named(args.llama_server, "llama_server", "BINARY [OPTIONS]")
    names = [*urls, *own, *servers]
    clash = {name for name in names if names.count(name) > 1}
    if clash:
        raise SpecDecodeError("serve", f"names a server twice: {sorted(clash)}")
    if args.serve_args is not None and (urls or own or servers):
        raise SpecDecodeError("serve_args", "is for a lone server: with --url or --serve, use --serve NAME=OPTIONS")
    param = "serve"
    if not urls and not own and not servers:
        own, param = {"specdecode": args.serve_args or ""}, "serve_args"
    placeholders = {name: "http://127.0.0.1:1" for name in [*own, *servers]}
    settings = LoadSettings({**urls, **placeholders}, args.dataset, concurrencies, args.rate, args.requests,
                            args.max_tokens, not args.stop_at_eos, rounds=args.rounds).validate()
    procs = []
    try:
        for name, options in own.items():  # one after another: each calibrates its pass cost alone
            proc, base = _start_own(options, param)
            procs.append(proc)
            urls[name] = base
        for name, value in servers.items():
            proc, base = _start_llama_server(value, "llama_server")
            procs.append(proc)
            urls[name] = base
        result = run_loadtest(replace(settings, servers=urls), progress=not args.no_progress)
    finally:
        for proc in procs:
            stop_server(proc)
    print(format_table(result))
    for path in write_results(result, args.out):
        print(f"wrote {path}", file=sys.stderr)
    return 0
