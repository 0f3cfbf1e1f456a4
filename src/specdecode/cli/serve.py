"""``specdecode serve``: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

from ..config import DEFAULTS, SpecDecodeError
from .options import add_model_args, add_speculation_args

MAX_QUEUE_LIMIT = 10000


def register(sub) -> None:
    from ..server import DEFAULT_MAX_QUEUE

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the id clients pass as 'model' (default: the target)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait; past it: 429 (default: %(default)s)")
    add_speculation_args(p)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(run=run)


def run(args) -> int:
    import uvicorn

    from ..api import load
    from ..server import Server, create_app

    if not 1 <= args.max_queue <= MAX_QUEUE_LIMIT:
        raise SpecDecodeError("max_queue", f"must be in [1, {MAX_QUEUE_LIMIT}] (got {args.max_queue})")
    defaults = DEFAULTS.with_(draft_len=args.draft_len, policy=args.policy)
    name = args.model_name or (args.target or "SmolLM2-135M-Instruct")
    def loader():
        return load(args.target, args.draft, dtype=args.dtype, device=args.device, backend=args.backend,
                    threads=args.threads)

    server = Server(loader, name, args.max_queue, defaults)
    print(f"specdecode: serving {name} (draft: {args.draft}) on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0
