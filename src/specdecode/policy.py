"""Choosing the draft length tau for each step.

* ``fixed``: always the configured tau.
* ``heuristic``: Hugging Face's schedule: +2 after a fully accepted block, -1 otherwise (>= 1).
* ``confidence``: the configured tau, but the drafter stops early once its own top probability
  falls below a threshold (``GenerationConfig.confidence``).
* ``cost`` (default): each step, pick the tau that maximises expected tokens per second from the
  online acceptance estimate and the cost curve, including tau = 0 (no speculation) when nothing
  pays. This is Leviathan et al. 2023, Theorem 3.8 (expected tokens per step
  ``(1 - a^(tau+1)) / (1 - a)``), generalised to per-position acceptance rates and a measured cost
  curve instead of a constant cost ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .stats import StepRecord

# Prior cost of a target pass over n tokens relative to a 1-token pass, before anything is measured.
# Measured on the default target on a 2-core CPU: 1 token ~43 ms, 2..8 tokens ~65-70 ms.
PRIOR_PASS_RATIO = 1.6


@dataclass
class CostModel:
    """Seconds per target pass over n tokens, and seconds per drafted token.

    Starts from a prior (or from a measured curve, e.g. ``bench``'s calibration) and follows the
    times the engine observes with an exponential moving average.
    """

    target_s: dict[int, float] = field(default_factory=dict)  # n tokens -> seconds
    draft_token_s: float | None = None
    smoothing: float = 0.2
    # A frozen model ignores observed timings. Seeded sampling plans with one, so that the draft
    # lengths - and with them the random draws - do not depend on machine noise.
    frozen: bool = False

    @classmethod
    def prior(cls, draft_ratio: float = 0.0) -> "CostModel":
        """The fixed prior curve: a 1-token pass costs 1 unit, a longer one PRIOR_PASS_RATIO units,
        a drafted token ``draft_ratio`` units."""
        curve = {n: 0.05 * (1.0 if n == 1 else PRIOR_PASS_RATIO) for n in range(1, 66)}
        return cls(curve, 0.05 * draft_ratio, frozen=True)

    def target(self, n: int) -> float:
        if n in self.target_s:
            return self.target_s[n]
        if not self.target_s:
            return 0.05 * (1.0 if n == 1 else PRIOR_PASS_RATIO)
        # nearest measured size scaled by the prior shape
        known = sorted(self.target_s)
        below = [k for k in known if k <= n]
        base = below[-1] if below else known[0]
        scale = 1.0 if (base > 1) == (n > 1) else (PRIOR_PASS_RATIO if n > 1 else 1 / PRIOR_PASS_RATIO)
        return self.target_s[base] * scale

    def draft(self) -> float:
        return self.draft_token_s or 0.0

    def observe_target(self, n: int, seconds: float) -> None:
        if self.frozen:
            return
        old = self.target_s.get(n)
        self.target_s[n] = seconds if old is None else old + self.smoothing * (seconds - old)

    def observe_draft(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or self.frozen:
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


class Policy:
    name = "fixed"

    def __init__(self, max_tau: int):
        self.max_tau = max_tau

    def choose(self) -> int:
        return self.max_tau

    def observe(self, rec: StepRecord) -> None:
        pass


class HeuristicPolicy(Policy):
    name = "heuristic"

    def __init__(self, max_tau: int):
        super().__init__(max_tau)
        self.tau = max_tau

    def choose(self) -> int:
        return self.tau

    def observe(self, rec: StepRecord) -> None:
        if rec.drafted == 0:
            return
        if rec.accepted == rec.drafted:
            self.tau = min(self.tau + 2, self.max_tau)
        else:
            self.tau = max(1, self.tau - 1)


class CostPolicy(Policy):
    """Expected-throughput maximiser with an online acceptance estimate.

    Acceptance per position is a decayed count with a Beta-like prior, so a few steps move it but
    one lucky block does not. When no tau pays, speculation is off; every ``probe_every`` plain
    steps it drafts one short block to notice if the text became predictable again.
    """

    name = "cost"

    def __init__(self, max_tau: int, cost: CostModel | None = None, prior: float = 0.5, prior_weight: float = 2.0,
                 decay: float = 0.95, probe_every: int = 16):
        super().__init__(max_tau)
        self.cost = cost or CostModel()
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.tried = [0.0] * max_tau
        self.passed = [0.0] * max_tau
        self.probe_every = probe_every
        self.plain_steps = 0
        self.last_prediction = 1.0

    def acceptance(self) -> list[float]:
        """Per-position estimates. Position 1 shrinks toward the prior; each later position
        shrinks toward the estimate before it, so positions rarely reached (because position 1
        keeps failing) do not keep an optimistic prior."""
        out, anchor = [], self.prior
        for s, t in zip(self.passed, self.tried):
            anchor = (s + self.prior_weight * anchor) / (t + self.prior_weight)
            out.append(anchor)
        return out

    def choose(self) -> int:
        tau, self.last_prediction = best_draft_len(self.acceptance(), self.cost, self.max_tau)
        if tau == 0 and self.max_tau > 0:
            self.plain_steps += 1
            if self.plain_steps % self.probe_every == 0:
                return min(2, self.max_tau)
        return tau

    def observe(self, rec: StepRecord) -> None:
        self.cost.observe_target(rec.target_tokens, rec.verify_s)
        self.cost.observe_draft(rec.drafted, rec.draft_s)
        if rec.drafted == 0:
            return
        for i in range(rec.drafted):
            self.tried[i] *= self.decay
            self.passed[i] *= self.decay
        for i in range(min(rec.accepted + 1, rec.drafted)):  # positions that were actually tested
            self.tried[i] += 1
            self.passed[i] += 1 if i < rec.accepted else 0


def make_policy(name: str, max_tau: int, cost: CostModel | None = None) -> Policy:
    if name == "cost":
        return CostPolicy(max_tau, cost)
    if name == "heuristic":
        return HeuristicPolicy(max_tau)
    return Policy(max_tau)  # "fixed" and "confidence" (the drafter stops early itself)
