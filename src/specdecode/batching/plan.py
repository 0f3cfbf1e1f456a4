"""What each request sends in a step: the engine's planner (``engine.BatchEngine.step``).

Two planners behind one interface (``Planner``):

* ``PolicyPlanner``: a lone request (a batch of one slot: ``generate``, ``serve --max-batch 1``)
  planned by its own ``policy.Policy`` (cost, heuristic, confidence or fixed: tau, trees, where a
  confident drafter stops), its whole draft sent; its prompt is read without the pending token,
  which goes with the first drafts.
* ``BudgetPlanner``: many requests sharing a pass, under the verification budget
  (``budget.allocate``): each drafts as deep as its draft length (a drafter that costs, the trained
  head, only as deep as the budget may send), and the budget sends each request's likeliest
  drafted tokens where they pay at the pass's price; the chunk that finishes a prompt carries the
  pending token, so the request's first token comes from that pass.

Both judge a draft that was not sent by the tokens the request then emits (``policy.judge_unsent``),
so that a request kept from drafting still learns how often its drafts would be accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import ConfigError, GenerationConfig
from ..drafters.base import Draft, Drafter, DraftPlan
from ..policy import Calibration, Policy, PositionAcceptance, judge_unsent
from ..sampling import PositionNoise
from ..stats import RunStats, StepRecord
from ..step import Settled, with_noise
from ..text import Output
from .budget import PassCost, Request, allocate

MAX_DRAFT = 7  # drafted tokens per request and step under the budget: a block of 8, where this CPU's passes stop paying
OLDEST_SHARE = 4  # the oldest prompt being read gets at least a quarter of a step's prompt tokens
BATCH_POLICIES = ("cost", "fixed")  # cost: the verification budget; fixed: every request drafts draft_len


@dataclass(eq=False)  # compared and hashed by identity
class Sequence:
    """One request in the batch: its slot, context and drafter, and what it has emitted."""

    id: int
    slot: int
    config: GenerationConfig
    context: list[int]  # prompt + emitted tokens; the last one pending (not yet in the slot's cache)
    drafter: Drafter
    output: Output
    seed: int
    stats: RunStats
    acceptance: PositionAcceptance
    prompt_tokens: int
    started: float
    generator: torch.Generator  # what a sampling drafter draws from without noise (the output does not depend on it)
    noise: PositionNoise | None  # its noise by output position (``step.admit``); None: greedy
    policy: Policy | None = None  # what plans its steps, for a lone request (``plan.PolicyPlanner``)
    trace: object | None = None  # a ``trace.TraceWriter`` its steps go to
    read: int = 0  # prompt tokens in the slot's cache so far
    # a draft the planner did not send, checked against what the request then emits: (the context
    # length it was drafted at, its tokens)
    unsent: tuple[int, list[int]] | None = None

    @property
    def reading_prompt(self) -> bool:
        return self.read < self.prompt_tokens - 1


@dataclass(frozen=True)
class StepPlan:
    sent: dict[int, Draft]  # slot -> the draft its block carries after the pending token
    allowed: dict[int, int]  # slot -> how many tokens it was allowed to draft (the step record's)
    chunks: dict  # Sequence -> (prompt tokens read this step, whether the chunk ends with the pending token)


class Planner(Protocol):
    def join(self, s: Sequence) -> str:
        """Take in a new request (ConfigError where this planner cannot plan it); the name of
        what plans it, for its statistics."""
        ...

    def plan(self, decoding: list[Sequence], reading: list[Sequence], room: int) -> StepPlan:
        """The step's drafts and prompt chunks, within ``room`` tokens beside every decoding
        request's pending token."""
        ...

    def observe_pass(self, shape: dict[int, int], seconds: float) -> None:
        """The pass just run: slot -> its block's tokens, and how long it took."""
        ...

    def settled(self, s: Sequence, draft: Draft, settled: Settled, allowed: int) -> None:
        """A request's block was verified (before its tokens are emitted)."""
        ...

    def emitted(self, s: Sequence, rec: StepRecord) -> None:
        """A request's tokens were emitted and its step recorded."""
        ...


def prompt_chunks(reading: list[Sequence], budget: int, with_pending: bool) -> dict:
    """Prompt tokens each reading request feeds this step, and whether the chunk ends with the
    pending token (``with_pending``: the chunk that finishes a prompt does, so its logits give the
    first token; else the pending token waits for the first drafts). The oldest reading request
    gets at least ``1 / OLDEST_SHARE`` of the budget, so a long prompt always moves; the rest goes
    to the prompts nearest their end first, so a short prompt does not wait behind a long one."""
    if not reading or budget < 1:
        return {}
    oldest = min(reading, key=lambda s: s.id)
    rest = {s: len(s.context) - s.read - (not with_pending) for s in reading}  # prompt tokens not yet read
    taken = {oldest: min(rest[oldest], max(1, budget // OLDEST_SHARE))}
    budget -= taken[oldest]
    for s in sorted(reading, key=lambda s: rest[s]):
        if budget < 1:
            break
        n = min(rest[s] - taken.get(s, 0), budget)
        taken[s] = taken.get(s, 0) + n
        budget -= n
    return {s: (n, with_pending and n == rest[s]) for s, n in taken.items() if n > 0}


def _judge_unsent(s: Sequence, observe) -> None:
    """Score a draft that was not sent as verification would have; ``observe(drafted, accepted)``."""
    judged = judge_unsent(s.context, *s.unsent)
    if judged is not None:
        observe(len(s.unsent[1]), judged)
        s.unsent = None


class PolicyPlanner(Planner):
    """A lone request, planned by its own policy (``policy_for(config, drafter)``)."""

    def __init__(self, policy_for, max_context: int):
        self.policy_for, self.max_context = policy_for, max_context  # 0: no limit but the model's

    def join(self, s: Sequence) -> str:
        s.policy = self.policy_for(s.config, s.drafter)
        return s.policy.name

    def plan(self, decoding: list[Sequence], reading: list[Sequence], room: int) -> StepPlan:
        sent, allowed = {}, {}
        for s in decoding:
            fits = self.max_context - len(s.context) if self.max_context else None  # tree tokens that fit
            plan = with_noise(s.policy.plan(s.output.left, fits), s.noise, len(s.output.tokens))
            sent[s.slot] = s.drafter.propose(s.context, plan, s.config, s.generator) if plan.max_tokens else Draft([])
            allowed[s.slot] = plan.max_tokens
        chunks = prompt_chunks(reading, room - sum(len(d) for d in sent.values()), with_pending=False)
        return StepPlan(sent, allowed, chunks)

    def observe_pass(self, shape: dict[int, int], seconds: float) -> None:
        pass  # the policy reads its pass times from the step records (``emitted``)

    def settled(self, s: Sequence, draft: Draft, settled: Settled, allowed: int) -> None:
        if not allowed and s.unsent is None and s.policy.judges_unsent:
            # a draft it did not send, after the context this step started from, judged by the
            # tokens emitted (its time counts as overhead, not as drafting)
            room = min(s.config.draft_len, s.output.left - 1)
            if room > 0:
                tokens = s.drafter.propose(s.context, DraftPlan(room), s.config, s.generator).tokens
                s.unsent = (len(s.context), tokens) if tokens else None
        kept = set(settled.branch)
        s.policy.observe_confidence(draft.path_scores(), [i in kept for i in range(len(draft))])

    def emitted(self, s: Sequence, rec: StepRecord) -> None:
        if s.unsent is not None:
            _judge_unsent(s, s.policy.observe_unsent)
        s.policy.observe(rec)


class BudgetPlanner(Planner):
    """Many requests under the verification budget, priced by ``cost`` (a pass's time by its shape,
    ``pass_shape``), with at most ``max_step_tokens`` tokens a pass and ``max_context`` a slot."""

    def __init__(self, cost: PassCost, pass_shape, max_step_tokens: int, max_context: int):
        self.cost, self.pass_shape = cost, pass_shape
        self.max_step_tokens, self.max_context = max_step_tokens, max_context
        # seconds a drafter that costs spends per token it may draft (a head step per depth),
        # followed over the steps; None until measured (then the drafter's prior is used)
        self.draft_s_per_token: float | None = None
        # how often a drafted token is accepted by the drafter's path probability (drafters that
        # give one: the head), over all requests: the same drafter and target throughout
        self.calibration = Calibration()

    def join(self, s: Sequence) -> str:
        if s.config.policy not in BATCH_POLICIES:
            raise ConfigError("policy", f"the batched engine plans with {' or '.join(BATCH_POLICIES)} "
                                        f"(got {s.config.policy!r})")
        return f"batch-{s.config.policy}"

    def plan(self, decoding: list[Sequence], reading: list[Sequence], room: int) -> StepPlan:
        t0 = time.perf_counter()
        rooms = self._draft_rooms(decoding)
        drafts = {s.slot: self._draft(s, rooms[s.slot]) for s in decoding}
        planned = sum(rooms[s.slot] for s in decoding if s.drafter.cost_prior > 0 and rooms[s.slot] > 0)
        if planned:
            per = (time.perf_counter() - t0) / planned
            self.draft_s_per_token = per if self.draft_s_per_token is None else 0.8 * self.draft_s_per_token + 0.2 * per
        fixed = {}  # policy "fixed": all its drafted tokens, while the step has room
        for s in decoding:
            if s.config.policy == "fixed":
                fixed[s.slot] = 1 + min(len(drafts[s.slot]), room)
                room -= fixed[s.slot] - 1
        chunks = prompt_chunks(reading, room, with_pending=True)
        lengths = self._block_lengths(decoding, drafts, chunks, fixed)
        for s in decoding:
            if (s.slot not in fixed and lengths[s.slot] == 1 and len(drafts[s.slot]) and drafts[s.slot].parents is None
                    and s.unsent is None):
                # its acceptance estimate only moves when its drafts are judged: judge this one by
                # the tokens the request emits next, at no cost to the pass
                s.unsent = (len(s.context), drafts[s.slot].tokens)
        return StepPlan({s.slot: drafts[s.slot].prune(lengths[s.slot] - 1) for s in decoding},
                        {s.slot: min(s.config.draft_len, MAX_DRAFT) for s in decoding}, chunks)

    def observe_pass(self, shape: dict[int, int], seconds: float) -> None:
        self.cost.observe(sum(shape.values()), seconds, *self.pass_shape(shape))

    def settled(self, s: Sequence, draft: Draft, settled: Settled, allowed: int) -> None:
        if len(draft):
            s.acceptance.observe(draft.depth(), settled.verdict.num_accepted)
        if draft.confidence:
            kept = set(settled.branch)
            self.calibration.observe(draft.path_scores(), [i in kept for i in range(len(draft))])

    def emitted(self, s: Sequence, rec: StepRecord) -> None:
        if s.unsent is not None:
            _judge_unsent(s, s.acceptance.observe)

    def _draft_rooms(self, decoding: list[Sequence]) -> dict[int, int]:
        """How many tokens each decoding request may draft this step. Drafters that cost (a draft
        head: a step of its own per drafted token, one request after another) draft only as deep
        as the budget would send at their acceptance so far, each token priced at its pass share
        plus its drafting time (``allocate`` over these requests); lookups draft in full."""
        rooms = {s.slot: min(s.config.draft_len, MAX_DRAFT, s.output.left - 1, self.max_context - len(s.context))
                 for s in decoding}
        costly = [s for s in decoding if s.config.policy != "fixed" and s.drafter.cost_prior > 0 and rooms[s.slot] > 0]
        if costly:
            per = self.draft_s_per_token
            if per is None:
                per = max(s.drafter.cost_prior for s in costly) * self.cost.lone_s
            cost = PassCost(self.cost.fixed_s, self.cost.per_token_s + per, self.cost.lone_s + per)
            requests = [Request(s.slot, s.acceptance.survival(rooms[s.slot])) for s in costly]
            others = {s.slot: 1 for s in decoding if s not in costly}
            planned = allocate(requests, others, cost, self.max_step_tokens, self.pass_shape)
            rooms.update({slot: n - 1 for slot, n in planned.items()})
        return rooms

    def _draft(self, s: Sequence, room: int) -> Draft:
        if room <= 0:
            return Draft([])
        plan = with_noise(DraftPlan(room), s.noise, len(s.output.tokens))
        return s.drafter.propose(s.context, plan, s.config, s.generator)

    def _survival(self, s: Sequence, draft: Draft) -> list[float]:
        """The budget's chance for each drafted token, best first: by the drafter's path probability
        as calibrated so far where it gives one (the head's chains and trees: a node is accepted
        exactly when its whole path is the target's), else by the request's acceptance at each
        position (lookups)."""
        if not draft.confidence:
            return s.acceptance.survival(len(draft))
        rates = self.calibration.rates()
        return sorted((rates[self.calibration.bin(p)] for p in draft.path_scores()), reverse=True)

    def _block_lengths(self, decoding: list[Sequence], drafts: dict[int, Draft], chunks,
                       fixed: dict[int, int]) -> dict[int, int]:
        """Block length (1 + drafted tokens sent) per decoding request: ``fixed`` for policy
        "fixed" (all its drafted tokens), the verification budget's choice for the others, priced
        with the prompt chunks and fixed blocks already in the pass."""
        budgeted = [s for s in decoding if s.slot not in fixed]
        if not budgeted:
            return dict(fixed)
        requests = [Request(s.slot, self._survival(s, drafts[s.slot])) for s in budgeted]
        other = {**{s.slot: n for s, (n, _) in chunks.items()}, **fixed}
        lengths = allocate(requests, other, self.cost, self.max_step_tokens, self.pass_shape)
        return {**lengths, **fixed}
