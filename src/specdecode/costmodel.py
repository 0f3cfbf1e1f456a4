"""The cost model: what a step costs, what it yields, and the speedup that follows.

Leviathan et al. 2023, Theorem 3.8: with acceptance rate a and draft length tau, a step emits
``(1 - a^(tau+1)) / (1 - a)`` tokens on average, and with a draft costing c target passes per
token the speedup is that over ``tau * c + 1``. Here the same idea is generalised to what we can
measure: a per-position acceptance rate (``a[i]``: position i+1 is accepted given all before it
were) and a measured cost curve ``T(n)`` for a target pass over n tokens, which on a CPU is far
from flat. Plain decoding costs ``T(1)`` per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .stats import decoding_steps

# Prior cost of a target pass over n tokens relative to a 1-token pass, before anything is measured:
# a straight line, the shape of a small model's passes on a CPU (docs/results.md has measured curves);
# the cost model replaces it with live timings as soon as it has them.
PRIOR_SLOPE = 0.07  # each token beyond the first adds this fraction of a 1-token pass


def prior_pass_ratio(n: int) -> float:
    return 1.0 + PRIOR_SLOPE * (n - 1)


@dataclass
class CostModel:
    """Seconds per target pass over n tokens, and seconds per drafted token.

    Starts from a prior (or from a measured curve, e.g. ``bench``'s calibration) and follows the
    times the engine observes with an exponential moving average.
    """

    target_s: dict[int, float] = field(default_factory=dict)  # n tokens -> seconds
    draft_token_s: float | None = None
    smoothing: float = 0.2
    # T(1), plain decoding's cost per token, is what every choice is weighed against. Unless it was
    # given, it is not known until a 1-token pass is observed, and inferring it from a larger pass
    # by the prior's shape can be far off (this CPU has read T(2)/T(1) as 1.05 one day and 1.5 on
    # another): ``baseline_stale`` asks for a plain step before the first speculative one and
    # after every ``refresh_every`` passes without one, so the baseline follows the machine.
    refresh_every: int = 32
    _since_baseline: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._since_baseline = 0 if 1 in self.target_s else self.refresh_every

    def target(self, n: int) -> float:
        if n in self.target_s:
            return self.target_s[n]
        if not self.target_s:
            return 0.05 * prior_pass_ratio(n)
        # the nearest measured size, scaled by the prior's shape
        base = min(self.target_s, key=lambda k: (abs(k - n), k))
        return self.target_s[base] * prior_pass_ratio(n) / prior_pass_ratio(base)

    def draft(self) -> float:
        return self.draft_token_s or 0.0

    def observe_target(self, n: int, seconds: float) -> None:
        self._since_baseline = 0 if n == 1 else self._since_baseline + 1
        old = self.target_s.get(n)
        self.target_s[n] = seconds if old is None else old + self.smoothing * (seconds - old)

    def baseline_stale(self) -> bool:
        """Whether the next step should be a plain one, to measure T(1)."""
        return self._since_baseline >= self.refresh_every

    def observe_draft(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        per = seconds / tokens
        old = self.draft_token_s
        self.draft_token_s = per if old is None else old + self.smoothing * (per - old)

    def step_seconds(self, tau: int) -> float:
        return tau * self.draft() + self.target(tau + 1)


def expected_tokens(acceptance: list[float], tau: int) -> float:
    """Expected tokens emitted by one step that drafts tau tokens: 1 + a1 + a1*a2 + ...
    (``acceptance[i]`` is the chance position i+1 is accepted given all before it were)."""
    total, run = 1.0, 1.0
    for i in range(tau):
        run *= acceptance[i] if i < len(acceptance) else (acceptance[-1] if acceptance else 0.0)
        total += run
    return total


def best_draft_len(acceptance: list[float], cost: CostModel, max_tau: int) -> tuple[int, float]:
    """The tau in [0, max_tau] with the most expected tokens per second, and its predicted speedup
    over plain decoding (one 1-token target pass per token)."""
    plain = 1.0 / cost.target(1)
    best, best_rate = 0, plain
    for tau in range(1, max_tau + 1):
        rate = expected_tokens(acceptance, tau) / cost.step_seconds(tau)
        if rate > best_rate * 1.0001:
            best, best_rate = tau, rate
    return best, best_rate / plain


def measure_target_curve(
    runner, n_max: int = 16, context: int = 128, reps: int = 5, clock=time.perf_counter
) -> dict[int, float]:
    """Median seconds of a target pass over n = 1..n_max new tokens after a ``context``-token prefix.

    The sizes are measured in interleaved rounds (1..n_max, then again), so that a stall of the
    machine lasting several passes spoils one round of a few sizes, which the median drops, rather
    than most repetitions of one size (and with it every prediction weighed against that size)."""
    runner.reset()
    runner.forward(list(range(100, 100 + context)), num_logits=0)
    times: dict[int, list[float]] = {n: [] for n in range(1, n_max + 1)}
    for round_ in range(reps + 1):
        for n in times:
            t = clock()
            runner.forward(list(range(300, 300 + n)), num_logits=n)
            if round_:  # the first round is a warm-up
                times[n].append(clock() - t)
            runner.truncate(context)
    runner.reset()
    return {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}


def predicted_speedup_of_steps(steps: list, cost: CostModel) -> float:
    """What the cost model says a run's steps should have achieved over plain decoding: the same
    tokens at ``T(1)`` each, against each step's target pass and drafting at modelled cost.
    Measured speedup over this is the loop's efficiency (1.0: it costs nothing beyond the passes).
    The step whose pass read the prompt's end is prefill, not decoding: left out."""
    steps = decoding_steps(steps)
    tokens = sum(s["emitted"] for s in steps)
    spent = sum(cost.target(s["target_tokens"]) + s["drafted"] * cost.draft() for s in steps)
    return tokens * cost.target(1) / spent if spent > 0 else 0.0
