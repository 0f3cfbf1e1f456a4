"""What each request sends in a step: the engine's planner (``engine.BatchEngine.step``).

Every request is planned by its own ``policy.Policy`` (``config.policy``: cost, heuristic,
confidence or fixed). How depends on what shares the pass:

* a request decoding alone (no other request decodes or reads a prompt in the pass: always, in a
  one-slot engine) is planned by its policy: tau, trees, where a confident drafter stops; its whole
  draft is sent, and the pass's time is its own, so the policy's cost curve learns from it;
* requests sharing a pass: the ``cost`` ones are planned by the verification budget
  (``budget.allocate``), which prices a pass by its shape (``PassCost``) and sends each request's
  likeliest drafted tokens where they pay; each drafts as deep as its draft length (a drafter
  that costs, the trained head, only as deep as the budget may send). A request under another
  policy drafts as its policy plans and sends all of it, while the step has room.

The budget for one request alone is the cost policy: both price the step's tokens against what
they are expected to emit, and the policy also chooses trees and where a confident drafter stops.
Each request's acceptance estimate and the drafter's calibration are the policy's, observed on
every step; its cost curve only from passes it had alone.

The chunk that finishes a prompt carries the pending token, so the request's first token comes
from that pass. A draft that was not sent is judged by the tokens the request then emits
(``policy.judge_unsent``), so that a request kept from drafting still learns how often its drafts
would be accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import GenerationConfig
from ..drafters.base import Draft, Drafter, DraftPlan
from ..policy import CostPolicy, Policy, judge_unsent
from ..sampling import PositionNoise
from ..stats import RunStats, StepRecord
from ..step import Settled, with_noise
from ..text import Output
from .budget import PassCost, Request, allocate

MAX_DRAFT = 7  # drafted tokens per request and step under the budget: a block of 8, where this CPU's passes stop paying
OLDEST_SHARE = 4  # the oldest prompt being read gets at least a quarter of a step's prompt tokens


@dataclass(eq=False)  # compared and hashed by identity
class Sequence:
    """One request in the batch: its slot, context, drafter and policy, and what it has emitted."""

    id: int
    slot: int
    config: GenerationConfig
    context: list[int]  # prompt + emitted tokens; the last one pending (not yet in the slot's cache)
    drafter: Drafter
    policy: Policy  # what plans its steps and holds its acceptance estimate (``Planner``)
    output: Output
    seed: int
    stats: RunStats
    prompt_tokens: int
    started: float
    generator: torch.Generator  # what a sampling drafter draws from without noise (the output does not depend on it)
    noise: PositionNoise | None  # its noise by output position (``step.admit``); None: greedy
    trace: object | None = None  # a ``trace.TraceWriter`` its steps go to
    read: int = 0  # prompt tokens in the slot's cache so far
    # a draft that was not sent, checked against what the request then emits: (the context length
    # it was drafted at, its tokens)
    unsent: tuple[int, list[int]] | None = None

    @property
    def reading_prompt(self) -> bool:
        return self.read < self.prompt_tokens - 1


@dataclass(frozen=True)
class StepPlan:
    sent: dict[int, Draft]  # slot -> the draft its block carries after the pending token
    allowed: dict[int, int]  # slot -> how many tokens it was allowed to draft (the step record's)
    chunks: dict  # Sequence -> (prompt tokens read this step, whether the chunk ends with the pending token)
    alone: Sequence | None = None  # the request that has the pass to itself, if one does


def prompt_chunks(reading: list[Sequence], budget: int) -> dict:
    """Prompt tokens each reading request feeds this step, and whether the chunk ends with the
    pending token (the chunk that finishes a prompt does, so its logits give the first token). The
    oldest reading request gets at least ``1 / OLDEST_SHARE`` of the budget, so a long prompt
    always moves; the rest goes to the prompts nearest their end first, so a short prompt does not
    wait behind a long one."""
    if not reading or budget < 1:
        return {}
    oldest = min(reading, key=lambda s: s.id)
    rest = {s: len(s.context) - s.read for s in reading}  # prompt tokens not yet read
    taken = {oldest: min(rest[oldest], max(1, budget // OLDEST_SHARE))}
    budget -= taken[oldest]
    for s in sorted(reading, key=lambda s: rest[s]):
        if budget < 1:
            break
        n = min(rest[s] - taken.get(s, 0), budget)
        taken[s] = taken.get(s, 0) + n
        budget -= n
    return {s: (n, n == rest[s]) for s, n in taken.items() if n > 0}


class Planner:
    """Plans every step of an engine's requests, each by its own policy (``Sequence.policy``).
    ``cost`` prices passes by their shape (``pass_shape``; None: a one-slot engine, whose passes are
    never shared), with at most ``max_step_tokens`` tokens a pass and ``max_context`` a slot (0: no
    limit but the model's)."""

    def __init__(self, cost: PassCost | None, pass_shape, max_step_tokens: int, max_context: int):
        self.cost, self.pass_shape = cost, pass_shape
        self.max_step_tokens, self.max_context = max_step_tokens, max_context
        # seconds a drafter that costs spends per token it may draft under the budget (a head step
        # per depth), followed over the steps; None until measured (then the drafter's prior is used)
        self.draft_s_per_token: float | None = None

    def plan(self, decoding: list[Sequence], reading: list[Sequence], room: int) -> StepPlan:
        """The step's drafts and prompt chunks, within ``room`` tokens beside every decoding
        request's pending token."""
        if len(decoding) == 1 and not reading:
            (s,) = decoding
            draft, allowed = self._by_policy(s)
            return StepPlan({s.slot: draft.prune(room)}, {s.slot: allowed}, {}, alone=s)
        budgeted = [s for s in decoding if isinstance(s.policy, CostPolicy)]
        drafts, allowed = self._budget_drafts(budgeted), {}
        whole = {}  # slot -> block length of a request its own policy plans: all it drafted, while there is room
        for s in decoding:
            if s in budgeted:
                allowed[s.slot] = min(s.config.draft_len, MAX_DRAFT)
                continue
            drafts[s.slot], allowed[s.slot] = self._by_policy(s)
            whole[s.slot] = 1 + min(len(drafts[s.slot]), room)
            room -= whole[s.slot] - 1
        chunks = prompt_chunks(reading, room)
        lengths = {**self._block_lengths(budgeted, drafts, chunks, whole), **whole}
        for s in budgeted:
            if lengths[s.slot] == 1 and len(drafts[s.slot]) and drafts[s.slot].parents is None and s.unsent is None:
                # its acceptance estimate only moves when its drafts are judged: judge this one by
                # the tokens the request emits next, at no cost to the pass
                s.unsent = (len(s.context), drafts[s.slot].tokens)
        return StepPlan({s.slot: drafts[s.slot].prune(lengths[s.slot] - 1) for s in decoding}, allowed, chunks)

    def observe_pass(self, shape: dict[int, int], seconds: float) -> None:
        """The pass just run: slot -> its block's tokens, and how long it took."""
        if self.cost is not None:
            self.cost.observe(sum(shape.values()), seconds, *self.pass_shape(shape))

    def settled(self, s: Sequence, draft: Draft, settled: Settled, plan: StepPlan) -> None:
        """A request's block was verified (before its tokens are emitted)."""
        if s is plan.alone and not plan.allowed[s.slot] and s.unsent is None and s.policy.judges_unsent:
            # a draft its policy did not send, after the context this step started from, judged by
            # the tokens emitted (its time counts as overhead, not as drafting)
            room = min(s.config.draft_len, s.output.left - 1)
            if room > 0:
                tokens = s.drafter.propose(s.context, DraftPlan(room), s.config, s.generator).tokens
                s.unsent = (len(s.context), tokens) if tokens else None
        kept = set(settled.branch)
        s.policy.observe_confidence(draft.path_scores(), [i in kept for i in range(len(draft))])

    def emitted(self, s: Sequence, rec: StepRecord, plan: StepPlan) -> None:
        """A request's tokens were emitted and its step recorded."""
        if s.unsent is not None:
            judged = judge_unsent(s.context, *s.unsent)
            if judged is not None:
                s.policy.observe_unsent(len(s.unsent[1]), judged)
                s.unsent = None
        s.policy.observe(rec, timed=s is plan.alone)

    def _by_policy(self, s: Sequence) -> tuple[Draft, int]:
        """The request's draft as its policy plans it, and the tokens it was allowed."""
        fits = self.max_context - len(s.context) if self.max_context else None  # tree tokens that fit
        plan = with_noise(s.policy.plan(s.output.left, fits), s.noise, len(s.output.tokens))
        draft = s.drafter.propose(s.context, plan, s.config, s.generator) if plan.max_tokens else Draft([])
        return draft, plan.max_tokens

    def _draft_rooms(self, budgeted: list[Sequence]) -> dict[int, int]:
        """How many tokens each budgeted request may draft this step. Drafters that cost (a draft
        head: a step of its own per drafted token, one request after another) draft only as deep
        as the budget would send at their acceptance so far, each token priced at its pass share
        plus its drafting time (``allocate`` over these requests); lookups draft in full."""
        rooms = {s.slot: min(s.config.draft_len, MAX_DRAFT, s.output.left - 1,
                             self.max_context - len(s.context) if self.max_context else MAX_DRAFT)
                 for s in budgeted}
        costly = [s for s in budgeted if s.drafter.cost_prior > 0 and rooms[s.slot] > 0]
        if costly:
            per = self.draft_s_per_token
            if per is None:
                per = max(s.drafter.cost_prior for s in costly) * self.cost.lone_s
            cost = PassCost(self.cost.fixed_s, self.cost.per_token_s + per, self.cost.lone_s + per)
            requests = [Request(s.slot, s.policy.estimate.survival(rooms[s.slot])) for s in costly]
            others = {s.slot: 1 for s in budgeted if s not in costly}
            planned = allocate(requests, others, cost, self.max_step_tokens, self.pass_shape)
            rooms.update({slot: n - 1 for slot, n in planned.items()})
        return rooms

    def _budget_drafts(self, budgeted: list[Sequence]) -> dict[int, Draft]:
        """Each budgeted request's draft, as deep as ``_draft_rooms`` allows; the time drafters that
        cost take per token is followed."""
        rooms = self._draft_rooms(budgeted)
        t0 = time.perf_counter()
        drafts = {}
        for s in budgeted:
            plan = with_noise(DraftPlan(rooms[s.slot]), s.noise, len(s.output.tokens))
            drafts[s.slot] = s.drafter.propose(s.context, plan, s.config, s.generator) if rooms[s.slot] > 0 \
                else Draft([])
        planned = sum(rooms[s.slot] for s in budgeted if s.drafter.cost_prior > 0 and rooms[s.slot] > 0)
        if planned:
            per = (time.perf_counter() - t0) / planned
            self.draft_s_per_token = per if self.draft_s_per_token is None else 0.8 * self.draft_s_per_token + 0.2 * per
        return drafts

    def _block_lengths(self, budgeted: list[Sequence], drafts: dict[int, Draft], chunks,
                       whole: dict[int, int]) -> dict[int, int]:
        """Block length (1 + drafted tokens sent) per budgeted request: the verification budget's
        choice, priced with the prompt chunks and whole blocks already in the pass. A token's
        chance is the drafter's path probability as calibrated so far where it gives one (the
        head's chains and trees: a node is accepted exactly when its whole path is the target's),
        else the request's acceptance at each position (lookups)."""
        if not budgeted:
            return {}
        requests = []
        for s in budgeted:
            draft = drafts[s.slot]
            if draft.confidence:
                rates, bins = s.policy.calibration.rates(), s.policy.calibration.bin
                chances = sorted((rates[bins(p)] for p in draft.path_scores()), reverse=True)
            else:
                chances = s.policy.estimate.survival(len(draft))
            requests.append(Request(s.slot, chances))
        other = {**{s.slot: n for s, (n, _) in chunks.items()}, **whole}
        return allocate(requests, other, self.cost, self.max_step_tokens, self.pass_shape)
