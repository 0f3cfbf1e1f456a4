"""``specdecode generate``: text from a prompt, streamed, with the run's statistics."""

from __future__ import annotations

import json
import sys

from ..config import SpecDecodeError
from .options import add_model_args, add_sampling_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt", nargs="?", help="the prompt ('-' or omitted: read standard input)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--trace", default=None, help="write one JSON line per step to this file")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..api import load
    from ..trace import TraceWriter

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = "" if sys.stdin.isatty() else sys.stdin.read()
    if not prompt.strip():
        raise SpecDecodeError("prompt", "must be a non-empty string (as an argument, or on standard input with '-')")
    config = config_from_args(args)  # validate before the slow model load
    decoder = load(args.target, args.draft, dtype=args.dtype, device=args.device, backend=args.backend,
                   threads=args.threads)
    meta = {"target": args.target or "default", "draft": args.draft}
    trace = TraceWriter(args.trace, meta=meta) if args.trace else None
    try:
        if args.json:
            result = decoder.generate(prompt, config, chat=not args.no_chat, trace=trace)
            print(json.dumps(result.to_json()))
            return 0
        last = None
        for event in decoder.stream(prompt, config, chat=not args.no_chat, trace=trace):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            last = event
        sys.stdout.write("\n")
        sys.stdout.flush()  # the text and its newline before the stats line on stderr, however it ended
        s = last.stats
        print(
            f"[{s.new_tokens} tokens, {s.tokens_per_second:.1f} tok/s, finish={last.finish_reason}, "
            f"drafter={s.drafter}, acceptance={s.acceptance_rate:.2f}, "
            f"tokens/target pass={s.mean_accepted_length:.2f}]",
            file=sys.stderr,
        )
        return 0
    finally:
        if trace is not None:
            trace.close()
