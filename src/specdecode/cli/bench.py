"""``specdecode bench``: speculation against plain decoding on a Spec-Bench-format file."""

from __future__ import annotations

from pathlib import Path

from ..peers import COMPARE
from .options import add_model_args, add_sampling_args, config_from_args


def register(sub) -> None:
    p = sub.add_parser("bench", help="speculative vs plain decoding (and HF) on a Spec-Bench question file")
    p.add_argument("--dataset", required=True, help="Spec-Bench-format question.jsonl")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    p.add_argument("--limit", type=int, default=None, help="at most N questions per category")
    p.add_argument("--compare", default=None,
                   help="also run the engines people use on the same prompts, comma-separated: hf (Hugging Face "
                        "generate with its nearest assisted generation), or llamacpp (llama.cpp plain decoding and "
                        f"its prompt lookup), ik (ik_llama.cpp plain decoding) and ik_server (ik's own llama-server "
                        f"from our build, plain and with its n-gram speculation); one of {', '.join(COMPARE)}")
    p.add_argument("--llama-server", default=None, metavar="PATH",
                   help="with --compare llamacpp: also run this llama-server binary on the same file, plain and "
                        "with --spec-type ngram-simple")
    p.add_argument("--out", default=None, help="directory for results.json and plots")
    p.add_argument("--trace", default=None, help="write the speculative runs' steps to this file")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..bench import BenchSettings, format_table, run_bench, write_results

    config = config_from_args(args)  # the settings generate takes, --stop and --ignore-eos included
    settings = BenchSettings(
        dataset=args.dataset, target=args.target, draft=args.draft, dtype=args.dtype, device=args.device,
        categories=tuple(c for c in (args.categories or "").split(",") if c) or None, limit=args.limit,
        compare=args.compare, llama_server=args.llama_server, trace=args.trace, chat=not args.no_chat,
        progress=not args.quiet, backend=args.backend, threads=args.threads,
    )
    summary = run_bench(settings, config)
    print(format_table(summary))
    if args.out:
        written = write_results(summary, Path(args.out))
        print(f"\nwrote {written[0]} and {', '.join(p.name for p in written[1:])}")
    return 0
