"""Choosing the draft length tau for each step.

* ``fixed``: always the configured tau.
* ``heuristic``: Hugging Face's schedule: +2 after a fully accepted block, -1 otherwise (>= 1).
* ``confidence``: the configured tau, but the drafter stops early once its own top probability
  falls below a threshold (``GenerationConfig.confidence``).
* ``cost`` (default): each step, pick the tau that maximises expected tokens per second from the
  online acceptance estimate and the cost curve (``costmodel``), including tau = 0 (no
  speculation) when nothing pays, and a plain step now and then while it does, to keep measuring
  the 1-token pass everything is weighed against (``CostModel.baseline_stale``). With a drafter
  that knows how sure it is of each token (``Drafter.dynamic``: the trained head, a draft model)
  the block length is decided token by token instead (EAGLE-2's dynamic draft): the drafter goes
  on while the chance that the whole block so far is accepted is above the break-even point where
  one more drafted token costs more time than it is expected to save, up to ``draft_len``. That
  chance is the product of the drafter's confidences, calibrated online (``Calibration``): a head
  trained on one kind of text is overconfident on another.
"""

from __future__ import annotations

from .costmodel import CostModel, best_draft_len
from .drafters.base import DraftPlan
from .stats import StepRecord


class Calibration:
    """How often a drafted block is accepted up to a token, by the product of the drafter's
    confidences up to that token, in ``bins`` equal bins. Each bin starts from a prior that takes
    the confidence at its word (``prior_weight`` pseudo-observations at the bin's centre), so an
    unseen drafter is trusted until it is measured; estimates are made monotone in confidence."""

    def __init__(self, bins: int = 10, prior_weight: float = 4.0):
        self.bins = bins
        self.tried = [prior_weight] * bins
        self.passed = [prior_weight * (b + 0.5) / bins for b in range(bins)]

    def bin(self, c: float) -> int:
        return min(self.bins - 1, max(0, int(c * self.bins)))

    def observe(self, paths: list[float], accepted: list[bool]) -> None:
        """One step's drafted tokens: each one's path probability (``Draft.path_scores``: the
        product of the drafter's confidences down to it) and whether the target accepted it."""
        for path, ok in zip(paths, accepted):
            b = self.bin(path)
            self.tried[b] += 1
            self.passed[b] += 1 if ok else 0

    def rates(self) -> list[float]:
        """Acceptance rate per bin, made non-decreasing by pooling adjacent bins that violate it,
        weighted by their counts (isotonic regression), so a well-measured bin outweighs a
        neighbour that holds only its prior."""
        blocks: list[list[float]] = []  # [passed, tried, bins pooled]
        for t, p in zip(self.tried, self.passed):
            blocks.append([p, t, 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                p2, t2, n2 = blocks.pop()
                blocks[-1][0] += p2
                blocks[-1][1] += t2
                blocks[-1][2] += n2
        return [p / t for p, t, n in blocks for _ in range(int(n))]

    def threshold(self, needed: float) -> float:
        """The smallest confidence product whose block is accepted with chance >= ``needed``
        (above 1 when no bin reaches it: draft a single token)."""
        for b, rate in enumerate(self.rates()):
            if rate >= needed:
                return b / self.bins
        return 1.0 + 1e-9


class PositionAcceptance:
    """How often a drafted token at each position is accepted given the ones before it were:
    decayed counts with a Beta-like prior, so a few steps move it but one lucky block does not.
    Position 1 shrinks toward ``prior``; each later position toward the estimate before it, so
    positions rarely reached (because position 1 keeps failing) do not keep an optimistic prior."""

    def __init__(self, positions: int, prior: float = 0.5, prior_weight: float = 2.0, decay: float = 0.95):
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.tried = [0.0] * positions
        self.passed = [0.0] * positions

    def rates(self) -> list[float]:
        out, anchor = [], self.prior
        for s, t in zip(self.passed, self.tried):
            anchor = (s + self.prior_weight * anchor) / (t + self.prior_weight)
            out.append(anchor)
        return out

    def survival(self, n: int) -> list[float]:
        """The chance that the first 1, 2, ..., n drafted tokens are all accepted."""
        out, run = [], 1.0
        rates = self.rates()
        for i in range(n):
            run *= rates[min(i, len(rates) - 1)] if rates else self.prior
            out.append(run)
        return out

    def observe(self, positions: int, accepted: int) -> None:
        """A step that drafted ``positions`` tokens (a tree: that deep) and had ``accepted`` accepted."""
        depth = min(positions, len(self.tried))
        for i in range(depth):
            self.tried[i] *= self.decay
            self.passed[i] *= self.decay
        for i in range(min(accepted + 1, depth)):  # positions that were actually tested
            self.tried[i] += 1
            self.passed[i] += 1 if i < accepted else 0


def judge_unsent(context: list[int], start: int, tokens: list[int]) -> int | None:
    """How many of ``tokens``, a one-hot draft made when the context was ``start`` tokens long
    and never sent, verification would have accepted, judged by the tokens emitted since
    (``context[start:]``); None while that is not settled.

    Exact for the rules one-hot drafts meet: greedy accepts a drafted token when it is the
    target's argmax, which is the token then emitted; the coupled rule when it is the target's
    Gumbel-max token, also the token then emitted; the standard rule accepts token x with
    probability p(x), the chance that the emitted token is x, so counting matches is an unbiased
    estimate of its acceptance."""
    emitted = context[start:start + len(tokens)]
    agree = 0
    while agree < len(emitted) and emitted[agree] == tokens[agree]:
        agree += 1
    if agree < len(emitted) or len(emitted) == len(tokens):  # a miss, or all of it seen
        return agree
    return None


class Policy:
    name = "fixed"
    judges_unsent = False  # whether the engine should judge drafts it does not send (``observe_unsent``)

    def __init__(self, max_tau: int):
        self.max_tau = max_tau

    def plan(self, tokens_left: int, room: int | None = None) -> DraftPlan:
        """The next proposal's plan: tau (``choose``), cut so that the step's tokens (drafted ones
        and the target's own) fit in ``tokens_left``, and trees cut to the ``room`` left in the
        model's context (None: unbounded)."""
        tau, speedup = self.choose()
        tree_size = self.tree_size if room is None else (lambda scores: min(self.tree_size(scores), room))
        return DraftPlan(max(0, min(tau, tokens_left - 1)), self.path_floor(speedup), tree_size)

    def choose(self) -> tuple[int, float]:
        """tau for the next step, and the speedup over plain decoding it is expected to give."""
        return self.max_tau, 1.0

    def path_floor(self, speedup: float) -> float:
        """Drafters that report confidences stop a block once their product falls below this
        (``speedup``: what ``choose`` expects of the step)."""
        return 0.0

    def tree_size(self, scores: list[float]) -> int:
        """How many of a drafted tree's candidates (path probabilities, best first) to verify:
        as many as a block may hold."""
        return min(len(scores), self.max_tau)

    def observe_confidence(self, paths: list[float], accepted: list[bool]) -> None:
        """A verified block's drafted tokens: each one's path probability (``Draft.path_scores``;
        empty where the drafter gives none) and whether it was accepted."""

    def observe(self, rec: StepRecord, timed: bool = True) -> None:
        """A step of the request it plans; ``timed``: its pass was this request's alone, so its
        times are this request's costs (a pass shared with others says nothing of them)."""

    def observe_unsent(self, drafted: int, accepted: int) -> None:
        pass


class ConfidencePolicy(Policy):
    """The configured tau; the drafter stops early once its top probability falls below
    ``GenerationConfig.confidence``."""

    name = "confidence"


class HeuristicPolicy(Policy):
    name = "heuristic"

    def __init__(self, max_tau: int):
        super().__init__(max_tau)
        self.tau = max_tau

    def choose(self) -> tuple[int, float]:
        return self.tau, 1.0

    def observe(self, rec: StepRecord, timed: bool = True) -> None:
        if rec.drafted == 0:
            return
        if rec.accepted == rec.drafted:
            self.tau = min(self.tau + 2, self.max_tau)
        else:
            self.tau = max(1, self.tau - 1)


class CostPolicy(Policy):
    """Expected-throughput maximiser with an online acceptance estimate (``PositionAcceptance``).
    When no tau pays, speculation is off; to notice if the text became predictable again it
    drafts one short block every ``probe_every`` plain steps, or, with ``judges_unsent`` (drafts
    the engine judges without sending them, ``judge_unsent``), never: the estimate then moves
    through ``observe_unsent``.
    """

    name = "cost"

    def __init__(self, max_tau: int, cost: CostModel | None = None, prior: float = 0.5, prior_weight: float = 2.0,
                 decay: float = 0.95, probe_every: int = 16, dynamic: bool = False,
                 calibration: Calibration | None = None, judges_unsent: bool = False):
        super().__init__(max_tau)
        self.judges_unsent = judges_unsent
        self.dynamic = dynamic
        self.calibration = calibration or Calibration()
        self.cost = cost or CostModel()
        self.estimate = PositionAcceptance(max_tau, prior, prior_weight, decay)
        self.probe_every = probe_every
        self.plain_steps = 0

    def acceptance(self) -> list[float]:
        return self.estimate.rates()

    def choose(self) -> tuple[int, float]:
        tau, speedup = best_draft_len(self.acceptance(), self.cost, self.max_tau)
        if tau == 0 and self.max_tau > 0:
            self.plain_steps += 1
            if not self.judges_unsent and self.plain_steps % self.probe_every == 0:
                return min(2, self.max_tau), speedup
            return 0, speedup
        if self.cost.baseline_stale():
            return 0, speedup  # a plain step, to measure T(1) (``CostModel.baseline_stale``)
        return (self.max_tau if self.dynamic else tau), speedup

    def path_floor(self, speedup: float) -> float:
        """Break-even for one more drafted token: it adds (chance the block so far and it are all
        accepted) tokens for the time of drafting it plus its share of the verification pass, which
        pays while that chance exceeds the current rate (tokens per second) times that time."""
        if not self.dynamic:
            return 0.0
        t1 = self.cost.target(1)
        slope = max(0.0, (self.cost.target(self.max_tau + 1) - t1) / max(1, self.max_tau))
        return self.calibration.threshold(max(1.0, speedup) * (self.cost.draft() + slope) / t1)

    def tree_size(self, scores: list[float]) -> int:
        """The number of candidates, best first, with the most expected tokens per second of
        verification: under greedy decoding a candidate is accepted exactly when its whole path
        is, so a step that verifies the best m emits 1 + sum of their calibrated path
        probabilities, for a pass over m + 1 tokens (the drafting is already paid for)."""
        rates = self.calibration.rates()
        best, best_rate, expected = 0, 1.0 / self.cost.target(1), 1.0
        for m, s in enumerate(scores[: self.max_tau], start=1):
            expected += rates[self.calibration.bin(s)]
            rate = expected / self.cost.target(m + 1)
            if rate > best_rate * 1.0001:
                best, best_rate = m, rate
        return best

    def observe_confidence(self, paths: list[float], accepted: list[bool]) -> None:
        self.calibration.observe(paths, accepted)  # also what the verification budget reads (``batching.plan``)

    def observe(self, rec: StepRecord, timed: bool = True) -> None:
        if timed:
            self.cost.observe_target(rec.target_tokens, rec.verify_s)
            self.cost.observe_draft(rec.drafted, rec.draft_s)
        if rec.drafted:
            self.estimate.observe(rec.positions, rec.accepted)

    def observe_unsent(self, drafted: int, accepted: int) -> None:
        """A draft that was not sent, judged by ``judge_unsent``."""
        self.estimate.observe(drafted, accepted)


def policy_maker(cost: CostModel | None = None, calibration: Calibration | None = None):
    """(config, drafter) -> the policy that plans a request's steps (``config.policy``), every one
    over the same cost curve and calibration: the same target and drafter throughout, so what was
    measured for one request stays measured for the next."""
    cost, calibration = cost or CostModel(), calibration or Calibration()

    def policy_for(config, drafter) -> Policy:
        return make_policy(config.policy, config.draft_len, cost, dynamic=drafter.dynamic, calibration=calibration,
                           judges_unsent=drafter.judged_unsent)

    return policy_for


def make_policy(name: str, max_tau: int, cost: CostModel | None = None, dynamic: bool = False,
                calibration: Calibration | None = None, judges_unsent: bool = False) -> Policy:
    if name == "cost":
        return CostPolicy(max_tau, cost, dynamic=dynamic, calibration=calibration, judges_unsent=judges_unsent)
    if name == "heuristic":
        return HeuristicPolicy(max_tau)
    if name == "confidence":
        return ConfidencePolicy(max_tau)
    return Policy(max_tau)
