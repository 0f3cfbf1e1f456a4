"""``specdecode explain``: why a run was (not) fast, from its trace."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("explain", help="why a run was (not) fast, from its trace")
    p.add_argument("trace", help="a file written by generate --trace (or bench --trace)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--plots", default=None, help="write PREFIX_timeline.png and PREFIX_acceptance.png")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..explain import analyse, load_trace, plot

    steps, prompt_steps, _ = load_trace(args.trace)
    report = analyse(steps, prompt_steps)
    if args.plots:
        report["plots"] = [str(p) for p in plot(report, steps, Path(args.plots))]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in report["advice"]:
            print(line)
        for p in report.get("plots", []):
            print(f"plot: {p}")
    return 0
