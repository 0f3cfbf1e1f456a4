"""``specdecode bench``: speculative decoding against plain decoding (and Hugging Face's assisted
generation) on a Spec-Bench-format question file, side by side in one process.

Each prompt is run by every contender back to back, in an order that alternates from prompt to
prompt, so that machine noise (other processes, frequency changes) hits them alike. Greedy runs
are also checked token for token against the baseline.

Speedup is a ratio of wall-clock tokens per second (tokens and seconds summed over the prompts
of a category); ``median_speedup`` is the median of per-prompt ratios. ``mean_accepted_tokens``
counts the target's own token (Spec-Bench's convention). ``predicted_speedup`` is what the cost
model (``costmodel``) says the run's steps should have achieved given the pass times measured
before the run and the run's mean cost per drafted token; ``efficiency`` is measured over
predicted (1.0: the loop costs nothing beyond the passes and drafting).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import (
    DEFAULT_BACKEND,
    DEFAULT_DEVICE,
    DEFAULT_DRAFT,
    DEFAULT_DTYPE,
    DEFAULT_TARGET_NAME,
    ConfigError,
    GenerationConfig,
)


@dataclass
class PromptResult:
    question_id: object
    category: str
    base_tokens: int
    base_s: float
    spec_tokens: int
    spec_s: float
    greedy_match: bool | None
    steps: list[dict]
    stats: dict
    # per peer engine (``peers``): (tokens, seconds, whether its greedy tokens equal our plain decoding's)
    peers: dict[str, tuple[int, float, bool | None]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return (
            (self.spec_tokens / self.spec_s) / (self.base_tokens / self.base_s)
            if self.base_tokens and self.spec_s
            else 0.0
        )


def load_questions(path: str, categories: list[str] | None, limit: int | None) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("dataset", f"no such file: {path}")
    questions = []
    try:
        with p.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    q = json.loads(line)
                    if not isinstance(q.get("turns"), list) or not q["turns"] or "category" not in q:
                        raise ValueError(f"line {n} lacks 'category' or 'turns'")
                    questions.append(q)
    except ValueError as exc:
        raise ConfigError("dataset", f"not a Spec-Bench question file ({exc})") from None
    known = sorted({q["category"] for q in questions})
    if categories:
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise ConfigError("categories", f"unknown {', '.join(unknown)}; the file has {', '.join(known)}")
        questions = [q for q in questions if q["category"] in categories]
    if limit is not None:
        if limit < 1:
            raise ConfigError("limit", f"must be >= 1 (got {limit})")
        per: dict[str, int] = {}
        kept = []
        for q in questions:
            if per.get(q["category"], 0) < limit:
                per[q["category"]] = per.get(q["category"], 0) + 1
                kept.append(q)
        questions = kept
    return questions


def summarize(results: list[PromptResult], cost) -> dict:
    from .costmodel import predicted_speedup_of_steps
    from .stats import rates_by_position

    def block(rs: list[PromptResult]) -> dict:
        base_tps = sum(r.base_tokens for r in rs) / sum(r.base_s for r in rs)
        spec_tps = sum(r.spec_tokens for r in rs) / sum(r.spec_s for r in rs)
        drafted = sum(r.stats["drafted"] for r in rs)
        accepted = sum(r.stats["accepted"] for r in rs)
        steps = sum(r.stats["steps"] for r in rs)
        width = max((len(r.stats["drafted_at"]) for r in rs), default=0)

        def summed(key: str) -> list[int]:  # per-position counts over the prompts, of unequal lengths
            return [sum(r.stats[key][i] for r in rs if i < len(r.stats[key])) for i in range(width)]

        d_at, r_at, a_at = summed("drafted_at"), summed("reached_at"), summed("accepted_at")
        all_steps = [s for r in rs for s in r.steps]
        predicted = predicted_speedup_of_steps(all_steps, cost)
        speedup = spec_tps / base_tps
        out = {
            "prompts": len(rs),
            "speedup": speedup,
            "median_speedup": statistics.median(r.speedup for r in rs),
            "min_speedup": min(r.speedup for r in rs),
            "mean_accepted_tokens": sum(r.spec_tokens for r in rs) / steps if steps else 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "acceptance_by_position": rates_by_position(a_at, r_at),
            "drafted_by_position": d_at,
            "reached_by_position": r_at,
            "tokens_per_second": spec_tps,
            "baseline_tokens_per_second": base_tps,
            "greedy_match": all(r.greedy_match for r in rs) if rs[0].greedy_match is not None else None,
            "greedy_mismatches": sum(1 for r in rs if r.greedy_match is False),
            "predicted_speedup": predicted,
            "efficiency": speedup / predicted if predicted else 0.0,
            # seconds per drafted token over the target's 1-token pass
            "draft_cost_ratio": (sum(r.stats["draft_s"] for r in rs) / drafted / cost.target(1)) if drafted else 0.0,
        }
        for name in rs[0].peers:  # our tokens per second over each peer's, on the same prompts
            peer_tps = sum(r.peers[name][0] for r in rs) / sum(r.peers[name][1] for r in rs)
            out[f"{name}_tokens_per_second"] = peer_tps
            out[f"ratio_vs_{name}"] = spec_tps / peer_tps
            same = [r.peers[name][2] for r in rs]
            out[f"{name}_identical_to_plain"] = None if same[0] is None else sum(same)
        return out

    cats: dict[str, list[PromptResult]] = {}
    for r in results:
        cats.setdefault(r.category, []).append(r)
    return {"overall": block(results), "categories": {c: block(rs) for c, rs in cats.items()}}


def cost_report(cost, acceptance: list[float], max_tau: int) -> dict:
    from .costmodel import best_draft_len, expected_tokens

    t1 = cost.target(1)
    by_tau = {}
    for tau in range(0, max_tau + 1):
        rate = expected_tokens(acceptance, tau) / cost.step_seconds(tau)
        by_tau[tau] = rate * t1
    best, best_speedup = best_draft_len(acceptance, cost, max_tau)
    return {
        "target_pass_ms": {n: cost.target_s[n] * 1000 for n in sorted(cost.target_s)},
        "pass_ratio": {n: cost.target_s[n] / t1 for n in sorted(cost.target_s)},
        "draft_token_ms": cost.draft() * 1000,
        "draft_cost_ratio": cost.draft() / t1,
        "predicted_speedup_by_tau": by_tau,
        "best_tau": best,
        "best_predicted_speedup": best_speedup,
    }


@dataclass(frozen=True)
class BenchSettings:
    """What ``run_bench`` runs, besides the generation settings."""

    dataset: str  # a Spec-Bench-format question.jsonl
    target: str | None = None  # None: the default target
    draft: str = DEFAULT_DRAFT
    dtype: str = DEFAULT_DTYPE
    device: str = DEFAULT_DEVICE
    categories: tuple[str, ...] | None = None  # None: all
    limit: int | None = None  # at most this many questions per category
    compare: str | None = None  # also run the engines people use: "hf" or "llamacpp" (``peers``)
    llama_server: str | None = None  # a llama-server binary, run beside llamacpp (``peers.LlamaServerPeer``)
    backend: str = DEFAULT_BACKEND  # see models.resolve_backend
    threads: int | None = None  # llama.cpp's threads (default: the machine's cores)
    trace: str | None = None  # write the speculative runs' steps to this file
    chat: bool = True  # apply the chat template
    progress: bool = True


def run_bench(settings: BenchSettings, config: GenerationConfig) -> dict:
    """Every question's first turn, by plain decoding and by speculation (and the ``compare`` peer's
    engines), back to back in an order that alternates; the summary ``format_table`` prints."""
    from .api import make_drafter
    from .drafters.base import NoDrafter
    from .engine import SpeculativeDecoder
    from .models import load_model
    from .peers import make_peers

    # sampled runs are reproducible by default: a benchmark that cannot be rerun cannot be compared
    if config.seed is None and not config.greedy:
        config = config.with_(seed=0)
    categories = list(settings.categories) if settings.categories else None
    questions = load_questions(settings.dataset, categories, settings.limit)
    if not questions:
        raise ConfigError("dataset", "no questions left after --categories/--limit")
    target = load_model(settings.target, param="target", dtype=settings.dtype, device=settings.device,
                        backend=settings.backend, threads=settings.threads)
    drafter = make_drafter(settings.draft, target, dtype=settings.dtype, device=settings.device)
    base = SpeculativeDecoder(target.model, target.tokenizer, NoDrafter())
    peers = make_peers(settings.compare, target, drafter, settings.threads, settings.llama_server)
    try:
        return _run(settings, config, questions, target, drafter, base, peers)
    finally:
        if peers is not None:
            peers.close()  # peers that run servers stop them


def _run(settings: BenchSettings, config: GenerationConfig, questions, target, drafter, base, peers) -> dict:
    from tqdm import tqdm

    from .costmodel import CostModel, measure_target_curve
    from .engine import SpeculativeDecoder
    from .trace import TraceWriter


    # the cost model: measured pass times 1..16 (and the draft's per-token cost, from the run); the
    # cost policy starts from it, then follows live timings
    curve = measure_target_curve(base.target, n_max=16)
    spec = SpeculativeDecoder(target.model, target.tokenizer, drafter, cost=CostModel(target_s=dict(curve)))
    meta = {"target": settings.target or "default", "draft": settings.draft, "bench": True}
    trace = TraceWriter(settings.trace, meta=meta) if settings.trace else None

    # warm-up: the first call of each path pays one-time costs (allocations, code paths)
    warm = spec.encode("Hello", chat=True)
    base.generate(warm, config.with_(max_new_tokens=4))
    spec.generate(warm, config.with_(max_new_tokens=4))

    results: list[PromptResult] = []
    bar = tqdm(questions, desc=f"bench {settings.draft}", unit="prompt", file=sys.stderr, disable=not settings.progress)
    for i, q in enumerate(bar):
        prompt_ids = spec.encode(q["turns"][0], chat=settings.chat)
        contenders = ["base", "spec"] + (["peers"] if peers else [])
        if i % 2:
            contenders.reverse()
        out = {}
        for who in contenders:
            if who == "peers":
                out["peers"] = peers.run(prompt_ids, config)
            else:
                dec = base if who == "base" else spec
                steps: list[dict] = []
                recorder = _StepRecorder(steps, trace if who == "spec" else None)
                res = dec.generate(prompt_ids, config, trace=recorder)
                out[who] = (res, steps)
        b, s = out["base"][0], out["spec"][0]
        peer_runs = {name: (len(tokens), seconds, (tokens == b.token_ids) if config.greedy else None)
                     for name, (tokens, seconds) in out.get("peers", {}).items()}
        results.append(PromptResult(
            q.get("question_id"), q["category"], len(b.token_ids), b.stats.total_s, len(s.token_ids), s.stats.total_s,
            (b.token_ids == s.token_ids) if config.greedy else None, out["spec"][1], s.stats.to_json(), peer_runs,
        ))
        bar.set_postfix(speedup=f"{results[-1].speedup:.2f}", accepted=f"{s.stats.mean_accepted_length:.2f}")
    if trace is not None:
        trace.close()

    # predictions and draft cost ratios use the pass times measured before the run (the live model
    # the policy followed drifts with whatever else the machine did) and the run's mean draft cost
    drafted = sum(r.stats["drafted"] for r in results)
    measured = CostModel(target_s=dict(curve), smoothing=0.0,
                         draft_token_s=sum(r.stats["draft_s"] for r in results) / drafted if drafted else 0.0)
    summary = summarize(results, measured)
    summary["cost_model"] = cost_report(
        measured, summary["overall"]["acceptance_by_position"] or [0.0], config.draft_len
    )
    from .runners import describe_engine

    summary["config"] = {
        "target": settings.target or f"default ({DEFAULT_TARGET_NAME})",
        "engine": describe_engine(target.model),
        "draft": settings.draft,
        "dataset": settings.dataset,
        "limit": settings.limit,
        "categories": list(settings.categories) if settings.categories else None,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "policy": config.policy,
        "draft_len": config.draft_len,
        "tree": config.tree,
        "stop": list(config.stop),
        "ignore_eos": config.ignore_eos,
        "compare": settings.compare,
        "prompts": len(results),
    }
    summary["prompts"] = [
        {"question_id": r.question_id, "category": r.category, "speedup": r.speedup, "tokens": r.spec_tokens,
         "greedy_match": r.greedy_match, "mean_accepted_tokens": r.stats["mean_accepted_length"]}
        for r in results
    ]
    return summary


class _StepRecorder:
    """A trace sink that keeps the step records for the cost model (and forwards to a file)."""

    def __init__(self, steps: list, trace=None):
        self.steps, self.trace = steps, trace

    def header(self, **info):
        if self.trace is not None:
            self.trace.header(**info)

    def step(self, rec):
        self.steps.append(rec.to_json())
        if self.trace is not None:
            self.trace.step(rec)

    def summary(self, stats, finish_reason):
        if self.trace is not None:
            self.trace.summary(stats, finish_reason)


def peer_names(block: dict) -> list[str]:
    """The peer engines a summary block compares against (``ratio_vs_NAME`` keys)."""
    return [k[len("ratio_vs_"):] for k in block if k.startswith("ratio_vs_")]


def format_table(summary: dict) -> str:
    peers = peer_names(summary["overall"])
    head = (f"{'category':<16}{'n':>4}{'speedup':>9}{'median':>8}{'min':>7}{'pred':>7}{'eff':>6}{'acc.tok':>8}"
            f"{'acc.rate':>9}{'draft':>7}{'tok/s':>8}{'base':>7}{'match':>7}")
    for name in peers:
        width = _peer_width(name)
        head += f"{name + ' tok/s':>{width}}{'vs ' + name:>{width}}"
    lines = [head, "-" * len(head)]
    rows = list(summary["categories"].items()) + [("overall", summary["overall"])]
    for name, c in rows:
        match = "-" if c["greedy_match"] is None else ("yes" if c["greedy_match"] else f"no({c['greedy_mismatches']})")
        line = (f"{name:<16}{c['prompts']:>4}{c['speedup']:>8.2f}x{c['median_speedup']:>7.2f}x{c['min_speedup']:>6.2f}x"
                f"{c['predicted_speedup']:>6.2f}x{c['efficiency']:>6.2f}{c['mean_accepted_tokens']:>8.2f}{c['acceptance_rate']:>9.2f}"
                f"{c['draft_cost_ratio']:>7.3f}{c['tokens_per_second']:>8.1f}{c['baseline_tokens_per_second']:>7.1f}{match:>7}")
        for peer in peers:
            width = _peer_width(peer)
            line += f"{c[peer + '_tokens_per_second']:>{width}.1f}{c['ratio_vs_' + peer]:>{width - 1}.2f}x"
        if name == "overall":
            lines.append("-" * len(head))
        lines.append(line)
    cm = summary["cost_model"]
    ratios = ", ".join(f"{n}:{r:.2f}" for n, r in cm["pass_ratio"].items() if n in (2, 4, 8, 16))
    lines.append("")
    lines.append(f"target pass T(1) = {cm['target_pass_ms'][1]:.1f} ms; T(n)/T(1) {ratios}; draft token = "
                 f"{cm['draft_cost_ratio']:.3f} T(1); best fixed tau by the cost model: {cm['best_tau']} "
                 f"(predicted {cm['best_predicted_speedup']:.2f}x)")
    lines.append(LEGEND)
    if "engine" in summary.get("config", {}):
        lines.append(f"engine: {summary['config']['engine']}")
    return "\n".join(lines)


LEGEND = ("speedup: our tok/s over our plain decoding's (all prompts' tokens over all their seconds); median, min: "
          "per prompt; pred: the cost model's prediction from the pass times measured before the run; eff: "
          "speedup / pred; acc.tok: tokens per target pass, its own included; acc.rate: drafted tokens accepted; "
          "draft: a drafted token's cost in 1-token passes; tok/s, base: ours and our plain decoding's; match: "
          "greedy output identical to plain decoding; NAME tok/s, vs NAME: a peer's and ours over it")


def _peer_width(name: str) -> int:
    """A peer's two columns, wide enough that its headers never run into the next one's."""
    return max(len(name) + 7, 9)


PEER_COLOURS = ("tab:orange", "tab:purple", "tab:blue")  # none is the bars' green or red
MIN_REACHED = 20  # fewer tests of a position than this are left out of the acceptance plot


def write_plots(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cats = list(summary["categories"])
    fig, ax = plt.subplots(figsize=(max(6, len(cats) * 0.7 + 2), 4))
    values = [summary["categories"][c]["speedup"] for c in cats]
    bars = ax.bar(cats, values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axhline(1.0, color="black", lw=0.8)
    if any("predicted_speedup" in summary["categories"][c] for c in cats):
        ax.scatter(
            cats,
            [summary["categories"][c]["predicted_speedup"] for c in cats],
            color="black",
            marker="_",
            s=300,
            label="cost-model prediction",
            zorder=3,
        )
        ax.legend()
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    for k, name in enumerate(peer_names(summary["overall"])):  # our tokens/s over each peer engine's
        ax.scatter(cats, [summary["categories"][c][f"ratio_vs_{name}"] for c in cats], marker="o", s=25,
                   color=PEER_COLOURS[k % len(PEER_COLOURS)], label=f"ours / {name}", zorder=4)
        ax.legend(fontsize=8)
    ax.set_ylabel("tokens/s over plain decoding's\n(dots: over each peer's)")
    ax.set_title(f"speedup per category ({summary['config']['draft']}, overall {summary['overall']['speedup']:.2f}x)")
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.tight_layout()
    paths.append(out / "speedup_by_category.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4))
    colors = plt.get_cmap("tab20").colors  # 13 Spec-Bench categories: tab10 would repeat colours
    for k, (name, c) in enumerate(list(summary["categories"].items()) + [("overall", summary["overall"])]):
        # a position reached a handful of times says nothing (1 of 2 reads as 0.5): leave it out
        # (counts never grow with the position, so what is kept is a prefix)
        acc = [a for a, n in zip(c["acceptance_by_position"], c["reached_by_position"]) if n >= MIN_REACHED]
        if acc:
            overall = name == "overall"
            ax.plot(range(1, len(acc) + 1), acc, marker="o", lw=2.5 if overall else 1,
                    color="black" if overall else colors[k % len(colors)], label=name)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance, given the earlier\npositions were accepted")
    ax.set_ylim(0, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"acceptance by draft position (positions reached at least {MIN_REACHED} times)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths.append(out / "acceptance_by_position.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_results(summary: dict, out: Path) -> list[Path]:
    """``results.json`` and the plots under ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return [out / "results.json", *write_plots(summary, out)]
