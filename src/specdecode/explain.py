"""``specdecode explain TRACE``: where the time of a speculative run went, and what to change.

The trace gives, per step, the draft length the policy allowed, what was drafted and accepted, and
the time spent drafting, verifying and elsewhere. From it we rebuild the cost model (a target pass
over n tokens, ``T(n)``; a drafted token, ``c``) and the acceptance by position, predict the run's
speedup, and then ask, one factor at a time, how much faster it would have been had that factor
been perfect: every drafted token accepted, drafting free, verification as cheap as a 1-token pass,
no loop overhead. The factor with the largest gain is the bottleneck (``acceptance``,
``draft_cost``, ``verification_cost`` or ``overhead``; ``none`` when none would gain 5%). A run whose
policy kept speculation off most of the time is named as such first (``policy_off``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .config import ConfigError
from .costmodel import CostModel, best_draft_len, prior_pass_ratio
from .stats import decoding_steps, rates_by_position, tally_positions


def load_steps(path: str) -> tuple[list[dict], list[dict]]:
    """A trace's decoding steps (not the step whose pass read the prompt's end: prefill) and its runs."""
    steps, _, runs = load_trace(path)
    return steps, runs


def load_trace(path: str) -> tuple[list[dict], list[dict], list[dict]]:
    """A trace's decoding steps, its prompt steps (each a pass that read a prompt's end and gave
    its first token) and its runs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("trace", f"no such file: {path}")
    records, runs = [], []
    with p.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError("trace", f"line {n} of {path} is not JSON: is this a specdecode trace?") from None
            if obj.get("type") == "step":
                records.append(obj)
            elif obj.get("type") == "run":
                runs.append(obj)
    steps = decoding_steps(records)
    if not steps:
        raise ConfigError("trace", f"{path} holds no decoding steps (write one with specdecode generate --trace FILE)")
    return steps, [r for r in records if r.get("prompt_tokens")], runs


def _median(xs):
    return statistics.median(xs) if xs else None


def cost_from_steps(steps: list[dict]) -> CostModel:
    """T(n) as the median verification time of steps with n target tokens; the draft's cost per token.
    Without a plain step, T(1) is the model's extrapolation from the smallest block by the prior's
    shape (``CostModel.target``)."""
    by_n: dict[int, list[float]] = {}
    for s in steps:
        by_n.setdefault(s["target_tokens"], []).append(s["verify_s"])
    curve = {n: _median(v) for n, v in by_n.items()}
    drafted = sum(s["drafted"] for s in steps)
    draft_s = sum(s["draft_s"] for s in steps if s["drafted"])
    return CostModel(target_s=curve, draft_token_s=draft_s / drafted if drafted else 0.0)


def _positions(step: dict) -> int:
    """Draft positions a traced step tested: its chain's length or its tree's depth."""
    depth = step.get("depth")
    return step["drafted"] if depth is None else depth


def acceptance_by_position(steps: list[dict]) -> tuple[list[float], list[int], list[int]]:
    """Acceptance at each position given the earlier ones were accepted, as ``RunStats`` counts
    it, how many steps drafted each position, and how many reached (tested) it."""
    drafted_at: list[int] = []
    reached_at: list[int] = []
    accepted_at: list[int] = []
    for s in steps:
        tally_positions(drafted_at, reached_at, accepted_at, _positions(s), s["accepted"])
    return rates_by_position(accepted_at, reached_at), drafted_at, reached_at


def _speedup(steps, cost: CostModel, *, accept_all=False, free_draft=False, flat_verify=False, no_overhead=False):
    t1 = cost.target(1)
    tokens = 0
    spent = 0.0
    for s in steps:
        tokens += (_positions(s) + 1) if accept_all else s["emitted"]
        verify = t1 if flat_verify else cost.target(s["target_tokens"])
        draft = 0.0 if free_draft else s["drafted"] * cost.draft()
        overhead = 0.0 if no_overhead else s["overhead_s"]
        spent += verify + draft + overhead
    # plain decoding at its best: T(1) per token and nothing else
    return tokens * t1 / spent if spent > 0 else 0.0


def analyse(steps: list[dict], prompt_steps: list[dict] = ()) -> dict:
    """The report on decoding ``steps``; ``prompt_steps`` (the passes that read a prompt's end, each
    giving its first token) count into tokens and passes as ``generate`` counts them, and into
    nothing else: their time is prefill."""
    cost = cost_from_steps(steps)
    t1 = cost.target(1)
    n = len(steps)
    total = sum(s["draft_s"] + s["verify_s"] + s["overhead_s"] for s in steps)
    drafted = sum(s["drafted"] for s in steps)
    accepted = sum(s["accepted"] for s in steps)
    tokens = sum(s["emitted"] for s in [*steps, *prompt_steps])  # as generate counts them
    acc_pos, drafted_at, reached_at = acceptance_by_position(steps)
    off = sum(1 for s in steps if s["draft_len"] == 0) / n
    used = [s["target_tokens"] for s in steps if s["drafted"]]
    typical_block = int(_median(used)) if used else 1
    predicted = _speedup(steps, cost)
    gains = {
        "acceptance": _speedup(steps, cost, accept_all=True) / predicted if predicted else 0.0,
        "draft_cost": _speedup(steps, cost, free_draft=True) / predicted if predicted else 0.0,
        "verification_cost": _speedup(steps, cost, flat_verify=True) / predicted if predicted else 0.0,
        "overhead": _speedup(steps, cost, no_overhead=True) / predicted if predicted else 0.0,
    }
    max_tau = max(8, max((s["draft_len"] for s in steps), default=0))
    rates = acc_pos or [0.0]
    best_tau, best_speedup = best_draft_len(rates, cost, max_tau)
    collapse = next((i + 1 for i, a in enumerate(acc_pos) if a < 0.5), None)

    if off >= 0.5:
        bottleneck = "policy_off"
    else:
        factor, gain = max(gains.items(), key=lambda kv: kv[1])
        bottleneck = factor if gain >= 1.05 else "none"

    report = {
        "steps": n,
        "passes": n + len(prompt_steps),  # target passes, the prompt's included (generate's count)
        "tokens": tokens,
        "time_s": total,
        "time_split": {
            "draft": sum(s["draft_s"] for s in steps) / total if total else 0.0,
            "verify": sum(s["verify_s"] for s in steps) / total if total else 0.0,
            "overhead": sum(s["overhead_s"] for s in steps) / total if total else 0.0,
        },
        "per_step_ms": {
            "draft": 1000 * sum(s["draft_s"] for s in steps) / n,
            "verify": 1000 * sum(s["verify_s"] for s in steps) / n,
            "overhead": 1000 * sum(s["overhead_s"] for s in steps) / n,
        },
        "tokens_per_target_pass": tokens / (n + len(prompt_steps)),
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "acceptance_by_position": acc_pos,
        "drafted_by_position": drafted_at,
        "reached_by_position": reached_at,
        "acceptance_collapses_at": collapse,
        "policy_off_fraction": off,
        "target_pass_ms": {
            k: 1000 * cost.target(k) for k in sorted({1, *cost.target_s})
        },  # T(1) inferred if not measured
        "t1_measured": 1 in cost.target_s,
        "smallest_block": min(cost.target_s),
        "verify_cost_ratio_at_typical_block": cost.target(typical_block) / t1,
        "typical_block": typical_block,
        "draft_cost_ratio": cost.draft() / t1 if t1 else 0.0,
        "overhead_ratio": statistics.fmean(s["overhead_s"] for s in steps) / t1 if t1 else 0.0,
        "predicted_speedup": predicted,
        "gain_if_perfect": gains,
        "bottleneck": bottleneck,
        "recommended_draft_len": best_tau,
        "recommended_predicted_speedup": best_speedup,
    }
    report["advice"] = advice(report)
    return report


def advice(r: dict) -> list[str]:
    """Plain-words statements, each with the figures behind it."""
    out = []
    split = r["time_split"]
    prompts = r["passes"] - r["steps"]
    out.append(
        f"{r['tokens']} tokens in {r['passes']} target passes: {r['tokens_per_target_pass']:.2f} tokens per pass"
        + (f" (the {'pass' if prompts == 1 else f'{prompts} passes'} that read the prompt gave the first token)"
           if prompts else "")
        + f". Time of the {r['steps']} decoding steps: {100 * split['verify']:.0f}% verifying, "
        f"{100 * split['draft']:.0f}% drafting, {100 * split['overhead']:.0f}% loop overhead (per step "
        f"{r['per_step_ms']['verify']:.1f} / {r['per_step_ms']['draft']:.1f} / {r['per_step_ms']['overhead']:.1f} ms)."
    )
    pos = ", ".join(f"{i + 1}:{a:.2f}" for i, (a, reached) in
                    enumerate(zip(r["acceptance_by_position"][:8], r["reached_by_position"])) if reached)
    if pos:
        out.append(
            f"Acceptance {r['acceptance_rate']:.2f} overall; by position (given the earlier ones accepted): {pos}."
        )
    b = r["bottleneck"]
    g = r["gain_if_perfect"]
    if b == "policy_off":
        out.append(
            f"Bottleneck: speculation was off in {100 * r['policy_off_fraction']:.0f}% of steps - the policy judged "
            f"that drafting does not pay here (acceptance {r['acceptance_rate']:.2f} against a verification pass "
            f"costing {r['verify_cost_ratio_at_typical_block']:.2f}x a 1-token pass). The run is at plain-decoding "
            "speed by design; "
            "a better drafter for this text is the only way up."
        )
    elif b == "acceptance":
        where = (f"; it collapses at position {r['acceptance_collapses_at']}" if r["acceptance_collapses_at"] else "")
        out.append(
            f"Bottleneck: acceptance too low ({r['acceptance_rate']:.2f}{where}). Were every drafted token accepted, "
            f"the run would be {g['acceptance']:.2f}x faster. Use a draft that agrees better with the target, or "
            "shorter blocks."
        )
    elif b == "draft_cost":
        out.append(
            f"Bottleneck: the draft is too slow: a drafted token costs {r['draft_cost_ratio']:.2f} of a target pass "
            f"(it should be well under 0.1). Free drafting would make the run {g['draft_cost']:.2f}x faster. "
            "Use a smaller draft, or the n-gram drafter."
        )
    elif b == "verification_cost":
        out.append(
            f"Bottleneck: verification is expensive: a pass over {r['typical_block']} tokens costs "
            f"{r['verify_cost_ratio_at_typical_block']:.2f}x a 1-token pass. Were it as cheap as one token, the run "
            f"would be {g['verification_cost']:.2f}x faster. Shorter blocks, or a faster kernel path for small batches."
        )
    elif b == "overhead":
        out.append(
            f"Bottleneck: loop overhead: {r['overhead_ratio']:.2f} of a target pass per step outside the models, "
            "sampling included (temperature, top-k and top-p turn every scored position's logits into a "
            f"distribution). Without it the run would be {g['overhead']:.2f}x faster."
        )
    else:
        out.append("No single bottleneck: every factor is within 5% of ideal.")
    if not r["t1_measured"]:
        out.append(
            f"No plain step in this trace, so the 1-token pass ({r['target_pass_ms'][1]:.1f} ms) is inferred from the "
            f"{r['smallest_block']}-token one by a fixed shape (+{100 * (prior_pass_ratio(2) - 1):.0f}% per token), "
            "and the speedups below are estimates: run it with --policy cost (the default), which measures it, "
            "or compare with --draft none."
        )
    out.append(
        f"Predicted speedup of this run over plain decoding: {r['predicted_speedup']:.2f}x. The measured figures say a "
        f"draft length of {r['recommended_draft_len']} would give {r['recommended_predicted_speedup']:.2f}x"
        + (" (0 = do not speculate)" if r["recommended_draft_len"] == 0 else "")
        + "; --policy cost picks it online, step by step."
    )
    return out


BOTTLENECK_WORDS = {"acceptance": "acceptance", "draft_cost": "draft cost", "verification_cost": "verification cost",
                    "overhead": "loop overhead", "policy_off": "speculation off", "none": "none"}


def plot(report: dict, steps: list[dict], out_prefix: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(steps) + 1))  # decoding steps from 1, the prompt's pass not drawn
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, len(steps) * 0.06), 6), sharex=True)
    top.bar(x, [s["drafted"] for s in steps], color="lightgray", label="drafted")
    top.bar(x, [s["accepted"] for s in steps], color="tab:green", label="accepted")
    top.plot(x, [s["draft_len"] for s in steps], color="black", lw=0.8, drawstyle="steps-mid", label="tau allowed")
    top.set_ylabel("tokens")
    top.legend(fontsize=7, loc="upper right")
    top.set_title(f"timeline: {report['tokens']} tokens in {report['passes']} target passes; "
                  f"bottleneck: {BOTTLENECK_WORDS[report['bottleneck']]}")
    d = [1000 * s["draft_s"] for s in steps]
    v = [1000 * s["verify_s"] for s in steps]
    o = [1000 * s["overhead_s"] for s in steps]
    bottom.bar(x, d, color="tab:orange", label="draft")
    bottom.bar(x, v, bottom=d, color="tab:blue", label="verify")
    bottom.bar(x, o, bottom=[a + b for a, b in zip(d, v)], color="tab:red", label="overhead")
    bottom.set_ylabel("ms")
    bottom.set_xlabel("decoding step")
    bottom.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    paths = [out_prefix.with_name(out_prefix.name + "_timeline.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    reached = [i for i, n in enumerate(report["reached_by_position"]) if n]  # never tested: no bar, not 0
    ax.bar([i + 1 for i in reached], [report["acceptance_by_position"][i] for i in reached], color="tab:green")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance | earlier accepted")
    ax.set_title("acceptance by position")
    fig.tight_layout()
    paths.append(out_prefix.with_name(out_prefix.name + "_acceptance.png"))
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
