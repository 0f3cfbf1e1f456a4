"""``specdecode check``: is the output the target's? Greedy: token for token; sampling: a
chi-square test of the output distribution."""

from __future__ import annotations

import json

from ..config import DEFAULT_ALPHA, DEFAULT_CONTEXTS, DEFAULT_DRAWS
from .options import add_model_args, add_sampling_args, config_from_args

CHECK_MAX_NEW_TOKENS = 48  # greedy cases long enough to reach drafted, rejected and bonus tokens


def register(sub) -> None:
    p = sub.add_parser("check", help="empirical losslessness check of a target/drafter pair")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="seeded generations per context (sampling)")
    p.add_argument("--contexts", type=int, default=DEFAULT_CONTEXTS, help="contexts for the sampling check")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="overall significance level (Bonferroni-split)")
    p.add_argument("--compare", default=None,
                   help="llamacpp, ik or both (ik,llamacpp): also report how their plain decoding compares with "
                        "ours, and whether llama.cpp's prompt lookup leaves its own plain decoding (greedy)")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.set_defaults(run=run, max_new_tokens=CHECK_MAX_NEW_TOKENS)


INCONCLUSIVE = 3  # exit status of a check that tested too little to pass or fail (check.MIN_ACCEPTED)


def run(args) -> int:
    from ..api import load
    from ..check import check_prompts, format_report, run_check, validate_check

    config = config_from_args(args)
    validate_check(args.draws, args.alpha)
    spec = load(args.target, args.draft, dtype=args.dtype, device=args.device, backend=args.backend,
                threads=args.threads)
    prompts = check_prompts(config, args.contexts)
    peer = None
    if args.compare:
        from ..models import LoadedModel
        from ..peers import make_peers

        target = LoadedModel(spec.model, spec.tokenizer, args.target)
        peer = make_peers(args.compare, target, spec.drafter, args.threads)
    report = run_check(spec, config, prompts, args.draws, args.alpha / max(1, 2 * len(prompts)), progress=not args.json,
                       peer=peer)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report, spec.tokenizer))
    return 0 if report["passed"] else INCONCLUSIVE if report.get("inconclusive") else 1
