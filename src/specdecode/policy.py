"""Choosing the draft length tau for each step.

* ``fixed``: always the configured tau.
* ``heuristic``: Hugging Face's schedule: +2 after a fully accepted block, -1 otherwise (>= 1).
* ``confidence``: the configured tau, but the drafter stops early once its own top probability
  falls below a threshold (``GenerationConfig.confidence``).
* ``cost`` (default): each step, pick the tau that maximises expected tokens per second from the
  online acceptance estimate and the cost curve (``costmodel``), including tau = 0 (no
  speculation) when nothing pays.
"""

from __future__ import annotations

from .costmodel import CostModel, best_draft_len
from .stats import StepRecord

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
