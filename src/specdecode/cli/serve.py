"""``specdecode serve``: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

from ..config import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_STEP_TOKENS,
    DEFAULT_QUEUE_TIMEOUT_S,
    DEFAULT_SHUTDOWN_GRACE_S,
    DEFAULT_SLOT_CONTEXT,
    DEFAULT_TARGET_NAME,
    DEFAULTS,
    SpecDecodeError,
    check_serving,
)
from .options import add_model_args, add_speculation_args


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000,
                   help="the TCP port to listen on, 0 for any free one (default: %(default)s)")
    p.add_argument("--model-name", default=None, help="the id clients pass as 'model' (default: the target)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait; past it: 429 (default: %(default)s)")
    p.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT_S,
                   help="seconds a request may wait for a slot; then 429 with Retry-After (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"requests generated together, one pass per step (default: {DEFAULT_MAX_BATCH} where the "
                        "target batches - llamacpp, or torch's lean runner - and the drafter is not a draft "
                        "model; else 1: one at a time)")
    p.add_argument("--slot-context", type=int, default=DEFAULT_SLOT_CONTEXT,
                   help="tokens (prompt + output) one batched request may hold (default: %(default)s)")
    p.add_argument("--max-step-tokens", type=int, default=DEFAULT_MAX_STEP_TOKENS,
                   help="tokens per batched pass, prompt chunks included (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds after its headers within which a request body must have arrived; a slower one gets "
                        "408 and its connection is closed (default: %(default)s)")
    p.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE_S,
                   help="seconds an idle keep-alive connection stays open; under --ray rounded up to whole "
                        "seconds, Serve's proxy takes no fraction (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                   help="seconds running requests may take to finish on shutdown (default: %(default)s)")
    ray = p.add_argument_group("Ray Serve (pip install specdecode[ray])")
    ray.add_argument("--ray", action="store_true", help="serve as Ray Serve replicas (a local Ray instance "
                     "unless --ray-address)")
    ray.add_argument("--replicas", type=int, default=None, help="replicas, each with its own model (default: 1)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale between this ...")
    ray.add_argument("--max-replicas", type=int, default=None, help="... and this, on requests in flight")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. ray://head:10001 or auto)")
    add_speculation_args(p)
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    p.set_defaults(run=run)


def _exit_on_config_error(exc: Exception) -> None:
    """A loading error that is the user's to fix ends the server with the option named, as the CLI does."""
    if isinstance(exc, SpecDecodeError):
        print(f"specdecode: error: --{exc.param.replace('_', '-')}: {exc.message}", file=sys.stderr, flush=True)
        os._exit(2)


def _ray_options(args):
    """The Ray options, checked; a Ray option without --ray is an error, not ignored."""
    from ..server.ray_serve import RayOptions

    given = [name for name in ("replicas", "min_replicas", "max_replicas", "ray_address")
             if getattr(args, name) is not None]
    if not args.ray:
        if given:
            raise SpecDecodeError(given[0], "needs --ray")
        return None
    ray = importlib.util.find_spec("ray")  # not imported: the Ray module sets its environment first
    if ray is None or not any(os.path.isdir(os.path.join(d, "serve")) for d in ray.submodule_search_locations):
        raise SpecDecodeError("ray", "Ray Serve is not installed: pip install 'specdecode[ray]'")
    return RayOptions(args.replicas, args.min_replicas, args.max_replicas, args.ray_address, args.threads).validate()


def run(args) -> int:
    import uvicorn

    from ..server import Server, create_app
    from ..server.app import ModelSpec

    check_serving(args.max_queue, args.max_batch, args.slot_context, queue_timeout=args.queue_timeout,
                  shutdown_grace=args.shutdown_grace, body_timeout=args.body_timeout,
                  keep_alive_timeout=args.keep_alive_timeout)  # before the model loads
    if not 0 <= args.port <= 65535:
        raise SpecDecodeError("port", f"must be a TCP port in [0, 65535] (got {args.port})")
    ray_options = _ray_options(args)
    defaults = DEFAULTS.with_(draft_len=args.draft_len, policy=args.policy)
    name = args.model_name or (args.target or DEFAULT_TARGET_NAME)
    spec = ModelSpec(args.target, args.draft, args.dtype, args.device, args.backend, args.threads)
    options = dict(max_queue=args.max_queue, defaults=defaults, max_batch=args.max_batch,
                   slot_context=args.slot_context, max_step_tokens=args.max_step_tokens,
                   queue_timeout=args.queue_timeout, shutdown_grace=args.shutdown_grace, body_timeout=args.body_timeout)
    if ray_options is not None:
        from ..server.ray_serve import serve_forever

        serve_forever(spec, name, options, ray_options, args.host, args.port, keep_alive=args.keep_alive_timeout)
        return 0
    sock = _listen(args.host, args.port)  # before the model loads: a port taken is an error at once
    port = sock.getsockname()[1]
    server = Server(spec.load, name, on_load_error=_exit_on_config_error, **options)
    print(f"specdecode: serving {name} (draft: {args.draft}) on http://{args.host}:{port}", flush=True)
    config = uvicorn.Config(create_app(server), host=args.host, port=port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(args.shutdown_grace) + 2,
                            timeout_keep_alive=args.keep_alive_timeout)
    _run_uvicorn(config, server, sock)
    return 0


def _listen(host: str, port: int):
    """A socket bound to ``host:port`` (0: a free port), as uvicorn would bind it."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise SpecDecodeError("port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _run_uvicorn(config, server, sock) -> None:
    """uvicorn's server, which on SIGTERM or SIGINT first stops the worker (queued requests get
    503 at once, running ones the grace period, then 503 in their stream), so that the
    connections uvicorn then waits for end within that period."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if server.worker is not None and not self.should_exit:
                threading.Thread(target=server.worker.stop, args=(server.shutdown_grace,), daemon=True).start()
            super().handle_exit(sig, frame)

    StoppingServer(config).run(sockets=[sock])
