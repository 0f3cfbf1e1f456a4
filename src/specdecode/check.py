"""``specdecode check``: an empirical losslessness check of a configured target/drafter pair.

* Greedy (temperature 0): speculative output must be token-identical to plain decoding of the
  same target. On a mismatch we report the first differing position, both tokens, and the target's
  top-2 logit gap there: a gap near zero is a tie broken differently by float rounding (the
  1-token and the block pass use different matmul kernels), not a wrong acceptance rule.
* Sampling: at each context, many seeded speculative generations of ``depth`` tokens; the first
  token's empirical distribution is compared with the target's own sampling distribution there
  (computed exactly in one pass), and so is the second token's, among draws whose first token was
  the most likely one. Test: Pearson chi-square over the tokens expected at least 5 times (the rest
  pooled), at significance ``alpha``; we also report the total-variation distance.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .config import DEFAULT_CONTEXTS, ConfigError, GenerationConfig
from .drafters.base import NoDrafter
from .engine import SpeculativeDecoder
from .sampling import logits_to_probs

MIN_DRAWS = 20  # fewer draws leave the chi-square test without power
# a sampling check whose drafts were accepted fewer times than this (all contexts together) tested
# the acceptance rule too little to vouch for it: its verdict is "inconclusive", not "passed"
MIN_ACCEPTED = 20

CHECK_PROMPTS = [
    "Summarize in two sentences: The museum reopened after two years of renovation. Visitors can now see the "
    "restored ceiling paintings, a new wing for modern art, and an interactive exhibit for children.",
    "Write a Python function that returns the largest of three numbers.",
    "What are three benefits of regular exercise?",
    "Repeat the following list exactly: red, green, blue, red, green, blue, red, green, blue.",
]


@dataclass
class GreedyCase:
    prompt: str
    match: bool
    position: int | None = None
    speculative_token: int | None = None
    plain_token: int | None = None
    top2_gap: float | None = None
    verdict: str = "match"


def chi_square_test(counts: torch.Tensor, probs: torch.Tensor, alpha: float) -> dict:
    """Pearson chi-square goodness of fit over cells of expected count >= 5: the likeliest tokens
    one cell each, then the rest, in order of probability, grouped into cells of at least 5 expected
    draws each (a fixed partition, so the test stays exact for flat distributions too); tokens the
    target gives probability 0 form a cell of their own, which any draw fails."""
    n = float(counts.sum())
    order = torch.argsort(probs, descending=True)
    expected = (probs.double() * n)[order]
    observed = counts.double()[order]
    cells_obs, cells_exp = [], []
    acc_o = acc_e = 0.0
    zero = expected <= 0
    for o, e in zip(observed[~zero].tolist(), expected[~zero].tolist()):
        acc_o += o
        acc_e += e
        if acc_e >= 5:
            cells_obs.append(acc_o)
            cells_exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 or acc_o > 0:
        if cells_exp:
            cells_obs[-1] += acc_o
            cells_exp[-1] += acc_e
        else:
            cells_obs.append(acc_o)
            cells_exp.append(acc_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(cells_obs, cells_exp))
    impossible = float(observed[zero].sum())
    dof = max(1, len(cells_obs) - 1)
    if impossible > 0:
        stat = float("inf")
    # chi-square survival function: regularized upper incomplete gamma Q(dof/2, stat/2)
    p_value = 0.0 if impossible > 0 else float(torch.special.gammaincc(
        torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    tv = 0.5 * float((counts.double() / n - probs.double()).abs().sum())
    return {"draws": int(n), "chi2": stat, "dof": dof, "p_value": p_value, "tv_distance": tv, "alpha": alpha,
            "draws_with_zero_target_probability": int(impossible), "passed": p_value >= alpha}


def check_greedy(spec: SpeculativeDecoder, plain: SpeculativeDecoder, prompts: list[str], config: GenerationConfig,
                 tie_gap: float = 1e-3, plain_outputs: dict[str, list[int]] | None = None) -> list[GreedyCase]:
    """Each prompt's speculative output against ``plain_outputs[prompt]`` (plain decoding's tokens;
    generated here when not given)."""
    cases = []
    for prompt in prompts:
        want = plain_outputs[prompt] if plain_outputs is not None else plain.generate(prompt, config).token_ids
        got = spec.generate(prompt, config).token_ids
        i = _first_difference(got, want)
        if i is None:
            cases.append(GreedyCase(prompt, True))
            continue
        prefix = plain.encode(prompt) + want[:i]
        plain.target.reset()
        logits = plain.target.forward(prefix, num_logits=1)[0]
        top2 = torch.topk(logits, 2).values
        gap = float(top2[0] - top2[1])
        verdict = "numerical tie" if gap < tie_gap else "wrong output"
        cases.append(GreedyCase(prompt, False, i, got[i] if i < len(got) else None, want[i] if i < len(want) else None,
                                gap, verdict))
        plain.target.reset()
    return cases


def check_peer(peer, plain: SpeculativeDecoder, prompts: list[str], config: GenerationConfig,
               plain_outputs: dict[str, list[int]]) -> list[dict]:
    """The same question of another engine (``peers``): is its speculative decoding's greedy output
    its own plain decoding's, and how does its plain decoding compare with ours (``plain_outputs``,
    by prompt)? Per prompt, the first position where each of its runs leaves the other (None:
    identical)."""
    out = []
    for prompt in prompts:
        ours = plain_outputs[prompt]
        runs = {name: tokens for name, (tokens, _) in peer.run(plain.encode(prompt), config).items()}
        names = list(runs)
        row = {"prompt": prompt[:60]}
        for name, tokens in runs.items():
            row[f"{name}_vs_ours"] = _first_difference(tokens, ours)
        plain_name = names[0]  # a peer lists its plain decoding first
        for name in names[1:]:
            row[f"{name}_vs_{plain_name}"] = _first_difference(runs[name], runs[plain_name])
        out.append(row)
    return out


def _first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_sampling(spec: SpeculativeDecoder, prompts: list[str], config: GenerationConfig, draws: int, alpha: float,
                   depth: int = 3, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    results = []
    cfg = config.with_(max_new_tokens=depth, ignore_eos=True)
    for c, prompt in enumerate(prompts):
        ids = spec.encode(prompt)
        # the target's exact sampling distribution at the context (and after its likeliest next token)
        plain = spec.target
        plain.reset()
        first = logits_to_probs(plain.forward(ids, num_logits=1)[0], cfg.temperature, cfg.top_k, cfg.top_p)
        mode = int(first.argmax())
        plain.reset()
        second = logits_to_probs(plain.forward(ids + [mode], num_logits=1)[0], cfg.temperature, cfg.top_k, cfg.top_p)
        plain.reset()
        c1 = torch.zeros_like(first)
        c2 = torch.zeros_like(second)
        drafted = accepted = 0
        bar = tqdm(
            range(draws), desc=f"context {c + 1}/{len(prompts)}", file=sys.stderr, disable=not progress, leave=False
        )
        for k in bar:
            r = spec.generate(ids, cfg.with_(seed=1_000_003 * c + k))
            c1[r.token_ids[0]] += 1
            if r.token_ids[0] == mode and len(r.token_ids) > 1:
                c2[r.token_ids[1]] += 1
            drafted += r.stats.drafted
            accepted += r.stats.accepted
        t1 = chi_square_test(c1, first, alpha)
        t2 = chi_square_test(c2, second, alpha) if c2.sum() >= 20 else None
        results.append({
            "prompt": prompt[:60],
            "first_token": t1,
            "second_token_after_mode": t2,
            "drafted": drafted,
            "accepted": accepted,
            "passed": t1["passed"] and (t2 is None or t2["passed"]),
        })
    return results


def run_check(spec: SpeculativeDecoder, config: GenerationConfig, prompts: list[str] | None = None, draws: int = 1000,
              alpha: float = 1e-3, progress: bool = True, peer=None) -> dict:
    """Greedy: every prompt's output against plain decoding (and, with a ``peer`` engine, the same
    question of it, reported beside ours; it does not decide ``passed``). Sampling: chi-square
    tests of the first two tokens' distribution."""
    prompts = prompts or CHECK_PROMPTS
    if config.greedy:
        plain = SpeculativeDecoder(spec.model, spec.tokenizer, NoDrafter())
        plain_outputs = {prompt: plain.generate(prompt, config).token_ids for prompt in prompts}
        cases = check_greedy(spec, plain, prompts, config, plain_outputs=plain_outputs)
        real = [c for c in cases if not c.match and c.verdict != "numerical tie"]
        report = {"mode": "greedy", "passed": not real, "cases": [c.__dict__ for c in cases]}
        if peer is not None:
            report["peer"] = check_peer(peer, plain, prompts, config, plain_outputs)
        return report
    if peer is not None:
        raise ConfigError("compare", "the peer comparison is of greedy output; leave --temperature 0")
    results = check_sampling(spec, prompts, config, draws, alpha, progress=progress)
    # several tests: Bonferroni, so that a correct engine passes with probability >= 1 - alpha overall
    passed = all(r["passed"] for r in results)
    accepted = sum(r["accepted"] for r in results)
    inconclusive = passed and accepted < MIN_ACCEPTED
    return {"mode": "sampling", "passed": passed and not inconclusive, "inconclusive": inconclusive,
            "accepted": accepted, "contexts": results}


def validate_check(draws: int, alpha: float) -> None:
    if not isinstance(draws, int) or draws < MIN_DRAWS:
        raise ConfigError("draws", f"must be an integer >= {MIN_DRAWS} (got {draws!r})")
    if not 0 < alpha < 0.5:
        raise ConfigError("alpha", f"must be in (0, 0.5) (got {alpha})")


def check_prompts(config: GenerationConfig, contexts: int = DEFAULT_CONTEXTS) -> list[str]:
    """Every check prompt for the greedy check; the first ``contexts`` for the (slower) sampling one."""
    return CHECK_PROMPTS if config.greedy else CHECK_PROMPTS[:contexts]


def format_report(report: dict, tokenizer) -> str:
    lines = []
    if report["mode"] == "greedy":
        for c in report["cases"]:
            if c["match"]:
                lines.append(f"match      {c['prompt'][:60]!r}")
            else:
                lines.append(
                    f"{c['verdict'].upper():<10} {c['prompt'][:60]!r}: first difference at token {c['position']}: "
                    f"speculative {c['speculative_token']} {tokenizer.decode([c['speculative_token']])!r} vs plain "
                    f"{c['plain_token']} {tokenizer.decode([c['plain_token']])!r}; "
                    f"target top-2 logit gap {c['top2_gap']:.2e}"
                )
    else:
        for r in report["contexts"]:
            for name in ("first_token", "second_token_after_mode"):
                t = r[name]
                if t is None:
                    continue
                lines.append(
                    f"{'pass' if t['passed'] else 'FAIL':<5} {name:<24} {r['prompt']!r}: {t['draws']} draws, "
                    f"chi2 {t['chi2']:.1f} (dof {t['dof']}), p = {t['p_value']:.3g} (alpha {t['alpha']:.1g}), "
                    f"TV distance {t['tv_distance']:.3f}"
                )
            lines.append(f"      drafted {r['drafted']} tokens, accepted {r['accepted']}")
    for row in report.get("peer", []):
        lines.append("peer       " + f"{row['prompt']!r}: " + "; ".join(
            f"{key.replace('_vs_', ' vs ')}: " + ("identical" if at is None else f"differs from token {at}")
            for key, at in row.items() if key != "prompt"))
    if report.get("inconclusive"):
        lines.append(f"INCONCLUSIVE: drafts were accepted {report['accepted']} times (fewer than {MIN_ACCEPTED}), "
                     "too few to test the acceptance rule; draft with a drafter that agrees with the target more "
                     "often here (--draft head on torch, or a draft model), or raise --draws")
    elif report["passed"]:
        lines.append("PASSED: output is the target's")
    else:
        lines.append("FAILED: output differs from the target's")
    return "\n".join(lines)
