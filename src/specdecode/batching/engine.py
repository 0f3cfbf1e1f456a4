"""The decoding loop: requests in the slots of a batch runner, one target pass per step. A lone
request (``SpeculativeDecoder.stream``: ``generate``, ``bench``, ``check``, ``serve --max-batch 1``)
is a batch of one slot over any runner (``runners.base.OneSlot``), planned by its own policy
(``policy``: tau, trees and where a confident drafter stops; cost, heuristic, confidence or fixed);
many requests share a verification budget instead.

One step:
  1. every running request drafts after its context (its own drafter and state; a drafter that
     costs, the trained head, only as deep as the budget may send: ``_draft_rooms``; a lone
     request as deep as its policy plans: ``_draft_by_policy``);
  2. requests still reading their prompt get a chunk of it, from what the step's token budget
     leaves (``max_step_tokens``; ``_prompt_chunks``), so a long prompt never stalls the others and
     can be cancelled between chunks; under the budget the chunk that finishes a prompt carries
     the pending token, and so the request's first token comes from the same pass (a lone
     request's pending token waits for its first drafts instead);
  3. the verification budget (``budget.allocate``) decides how many drafted tokens each request
     sends (a chain's first ones, a tree's likeliest candidates; a lone request sends its whole
     draft); the target scores every
     request's ``[pending] + drafted`` block in one pass (ragged lengths and ragged cache lengths:
     each request in its own slot; chains beside trees on the torch runner);
  4. each request is verified on its own rows (ragged acceptance), its slot cut back to its own
     accepted context or branch, stop conditions applied; finished requests leave and their slots
     take new requests at the next step.

Determinism: greedy output is the target's argmax at every position, whatever the batch: on
llama.cpp through the same kernels (``runners.llamacpp_batch``), so bit-identical to the request
run alone; on torch the same function, up to the float rounding of products over more rows
(``runners.torch_batch``), as between a lone request's 1-token and k-token passes. Every request
is verified by one rule (``step.settle``), with noise keyed by its seed and output position, so a
seeded request gives the same tokens from ``generate`` and from a batch of any size, with any
drafter and draft lengths.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import count

import torch

from ..config import (
    DEFAULT_MAX_STEP_TOKENS,
    DEFAULT_SLOT_CONTEXT,
    MAX_BLOCK,
    ConfigError,
    GenerationConfig,
    check_batching,
)
from ..drafters.base import Draft, Drafter, DraftPlan
from ..policy import Calibration, Policy, PositionAcceptance, judge_unsent
from ..runners.base import Batchable, BatchRunner, Block, TreeBatchRunner, common_prefix
from ..sampling import PositionNoise
from ..stats import RunStats
from ..step import (
    StreamEvent,
    admit,
    emitted_logprobs,
    settle,
    step_record,
    with_noise,
)
from ..text import Output
from .budget import PassCost, Request, allocate

MAX_DRAFT = 7  # drafted tokens per request and step: a block of 8, where this CPU's passes stop paying
OLDEST_SHARE = 4  # the oldest prompt being read gets at least a quarter of a step's prompt tokens
BATCH_POLICIES = ("cost", "fixed")  # cost: the verification budget; fixed: every request drafts draft_len


@dataclass(frozen=True)
class Planned:
    """A lone request's draft for one step, and the draft length its policy allowed."""

    draft: Draft
    allowed: int


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
    policy: Policy | None = None  # what plans its steps when the engine plans by policy
    trace: object | None = None  # a ``trace.TraceWriter`` its steps go to
    read: int = 0  # prompt tokens in the slot's cache so far
    # a draft the budget did not send, checked against what the request then emits: (the context
    # length it was drafted at, its tokens)
    unsent: tuple[int, list[int]] | None = None

    @property
    def reading_prompt(self) -> bool:
        return self.read < self.prompt_tokens - 1


class BatchEngine:
    """Requests in up to ``runner.slots`` slots of a batch runner; ``step`` advances all of them."""

    def __init__(self, runner: BatchRunner, tokenizer, eos_ids: set[int], new_drafter,
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, cost: PassCost | None = None,
                 vocab_size: int | None = None, policy_for=None, calibration: Calibration | None = None,
                 holder: str = "a slot's context"):
        """``vocab_size``: the logits' columns (None: the tokenizer's tokens). ``policy_for``:
        (config, drafter) -> the ``Policy`` that plans a request's steps, its drafts then sent
        whole (a lone request); None: the verification budget plans every step. ``holder``: what
        a request's tokens must fit in, as errors name it."""
        self.runner, self.tokenizer, self.eos_ids = runner, tokenizer, eos_ids
        self.vocab_size = vocab_size or len(tokenizer)
        self.new_drafter = new_drafter  # () -> a fresh drafter for one request
        if not runner.slots < max_step_tokens <= MAX_BLOCK:  # every running request's token, and a prompt's
            raise ConfigError("max_step_tokens", f"must be in [{runner.slots + 1}, {MAX_BLOCK}] with "
                                                 f"{runner.slots} slots (got {max_step_tokens})")
        self.max_step_tokens = max_step_tokens
        self.max_context = runner.capacity  # 0: no limit but the model's
        self.policy_for, self.holder = policy_for, holder
        # the budget's pass prices, timed now; a policy keeps its own (``costmodel``)
        self.cost = cost or (PassCost.measure(self._time_pass) if policy_for is None else None)
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._ids = count()
        # seconds a drafter that costs spends per token it may draft (a head step per depth),
        # followed over the steps; None until measured (then the drafter's prior is used)
        self.draft_s_per_token: float | None = None
        # how often a drafted token is accepted by the drafter's path probability (drafters that
        # give one: the head), over all requests: the same drafter and target throughout
        self.calibration = calibration or Calibration()

    @classmethod
    def for_decoder(cls, decoder, slots: int, slot_context: int | None = None,
                    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS) -> "BatchEngine":
        """A batch engine over a loaded decoder's target, with a fresh copy of its drafter per
        request (``Drafter.spawn``), where its target runner can batch (``runners.base.Batchable``): a
        GGUF target on llama.cpp or ik_llama.cpp (chains: none or ngram), or a torch target the
        lean runner computes (also the trained head and its trees)."""
        check_batching(slots, slot_context)
        context = min(slot_context or DEFAULT_SLOT_CONTEXT, decoder.max_context)
        if isinstance(decoder.target, Batchable):
            runner = decoder.target.batch_runner(slots, context)
        else:
            raise ConfigError("max_batch", "batching several requests needs a GGUF target on llama.cpp or a "
                                           "Llama-family torch target on the lean runner; use --max-batch 1 here")
        template = decoder.drafter
        if template.spawn() is None:
            raise ConfigError("max_batch", f"batching several requests cannot give each its own copy of drafter "
                                           f"{template.name}; use --max-batch 1 for it")
        return cls(runner, decoder.tokenizer, decoder.eos_ids, template.spawn, max_step_tokens,
                   vocab_size=decoder.vocab_size)

    @property
    def free_slots(self) -> int:
        return self.runner.slots - len(self.running)

    def _time_pass(self, n: int) -> float:
        slot = self.runner.slots - 1  # free while the engine starts
        t = time.perf_counter()
        self.runner.forward([Block(slot, list(range(300, 300 + n)), n)])
        seconds = time.perf_counter() - t
        self.runner.clear(slot)
        return seconds

    def add(self, prompt_ids: list[int], config: GenerationConfig, trace=None) -> Sequence:
        """Start a request in a free slot (ConfigError when it cannot run here); its steps go to
        ``trace`` where one is given."""
        let_in = admit(prompt_ids, config, self.max_context, self.holder, self.tokenizer, self.eos_ids,
                       self.vocab_size)
        if self.policy_for is None and let_in.config.policy not in BATCH_POLICIES:
            raise ConfigError("policy", f"the batched engine plans with {' or '.join(BATCH_POLICIES)} "
                                        f"(got {let_in.config.policy!r})")
        if not self.free_slots:
            raise RuntimeError("no free slot: one request at a time per slot (finish or close the other stream)")
        slot, reused = self._slot_for(prompt_ids)
        self.runner.truncate(slot, reused)
        drafter = self.new_drafter()
        drafter.attach(self.runner.slot_runner(slot))
        policy = None if self.policy_for is None else self.policy_for(let_in.config, drafter)
        name = f"batch-{let_in.config.policy}" if policy is None else policy.name
        seq = Sequence(next(self._ids), slot, let_in.config, list(prompt_ids), drafter, let_in.output, let_in.seed,
                       RunStats(drafter=drafter.name, policy=name, prompt_tokens=len(prompt_ids)),
                       PositionAcceptance(MAX_DRAFT), len(prompt_ids), time.perf_counter(),
                       torch.Generator().manual_seed(let_in.seed), let_in.noise, policy, trace, read=reused)
        if trace is not None:
            trace.header(config=let_in.config, drafter=drafter.name, policy=name, prompt_tokens=len(prompt_ids),
                         seed=let_in.seed)
        self.running[slot] = seq
        return seq

    def _slot_for(self, prompt_ids: list[int]) -> tuple[int, int]:
        """A free slot for a prompt, and how many of the prompt's tokens its cache already holds.
        A slot keeps what its last request left (prefix caching): the free slot sharing the
        longest prefix with the prompt (a chat template's system turn, a conversation's earlier
        turns) reads only the rest; on a tie the lowest, as llama.cpp takes a run of consecutive
        slots into one micro-batch. The prompt's last token
        is always left to read: it is the pending token, whose logits give the first output."""
        held = {s: common_prefix(self.runner.cached[s], prompt_ids[:-1])
                for s in range(self.runner.slots) if s not in self.running}
        slot = max(held, key=lambda s: (held[s], -s))
        return slot, held[slot]

    def cancel(self, seq: Sequence) -> None:
        """Take a request out of the batch; its slot keeps its cache for a later prompt with the
        same prefix (``_slot_for``)."""
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, StreamEvent]]:
        if not self.running:
            return []
        t0 = time.perf_counter()
        seqs = list(self.running.values())
        decoding = [s for s in seqs if not s.reading_prompt]
        reading = [s for s in seqs if s.reading_prompt]
        room = self.max_step_tokens - len(decoding)  # after every running request's pending token
        if self.policy_for is None:
            sent, lengths, allowed, chunks = self._plan_by_budget(decoding, reading, room)
        else:  # each request's own policy; a prompt is read without its pending token, which goes with the drafts
            planned = {s.slot: self._draft_by_policy(s) for s in decoding}
            sent = {slot: p.draft for slot, p in planned.items()}
            allowed = {slot: p.allowed for slot, p in planned.items()}
            lengths = {slot: len(d) + 1 for slot, d in sent.items()}
            chunks = self._prompt_chunks(reading, room - sum(len(d) for d in sent.values()), with_pending=False)
        t1 = time.perf_counter()
        blocks = [Block(s.slot, [s.context[-1]] + sent[s.slot].tokens, lengths[s.slot],
                        None if sent[s.slot].parents is None else [-1] + [p + 1 for p in sent[s.slot].parents])
                  for s in decoding]
        for s, (n, carries_pending) in chunks.items():
            blocks.append(Block(s.slot, s.context[s.read:s.read + n], int(carries_pending)))
        t_pass = time.perf_counter()
        logits = self.runner.forward(blocks)
        pass_s = time.perf_counter() - t_pass
        if self.cost is not None:
            shape = {b.slot: len(b.tokens) for b in blocks}
            self.cost.observe(sum(shape.values()), pass_s, *self.runner.pass_shape(shape))
        events = []
        for s, (n, carries_pending) in chunks.items():
            s.read += n
            if carries_pending:  # the last chunk held the pending token too: its logits give the first token
                s.stats.prefill_s = time.perf_counter() - s.started
                events.append(self._advance(s, Draft([]), logits[s.slot], t1 - t0, pass_s, 1, 0))
            elif not s.reading_prompt:
                s.stats.prefill_s = time.perf_counter() - s.started
        for s in decoding:
            events.append(self._advance(s, sent[s.slot], logits[s.slot], t1 - t0, pass_s, lengths[s.slot],
                                        allowed[s.slot]))
        return events

    def _plan_by_budget(self, decoding: list[Sequence], reading: list[Sequence], room: int):
        """Drafts, block lengths, draft lengths allowed and prompt chunks of a step of many requests."""
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
        chunks = self._prompt_chunks(reading, room)
        lengths = self._block_lengths(decoding, drafts, chunks, fixed)
        for s in decoding:
            if (s.slot not in fixed and lengths[s.slot] == 1 and len(drafts[s.slot]) and drafts[s.slot].parents is None
                    and s.unsent is None):
                # its acceptance estimate only moves when its drafts are judged: judge this one by
                # the tokens the request emits next, at no cost to the pass
                s.unsent = (len(s.context), drafts[s.slot].tokens)
        sent = {s.slot: drafts[s.slot].prune(lengths[s.slot] - 1) for s in decoding}
        allowed = {s.slot: min(s.config.draft_len, MAX_DRAFT) for s in decoding}
        return sent, lengths, allowed, chunks

    def _draft_by_policy(self, s: Sequence) -> Planned:
        """A lone request's draft as its policy plans it (tau, trees cut to the room left)."""
        room = self.max_context - len(s.context) if self.max_context else None  # tree tokens that fit
        plan = with_noise(s.policy.plan(s.output.left, room), s.noise, len(s.output.tokens))
        draft = s.drafter.propose(s.context, plan, s.config, s.generator) if plan.max_tokens else Draft([])
        return Planned(draft, plan.max_tokens)

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
            planned = allocate(requests, others, cost, self.max_step_tokens, self.runner.pass_shape)
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

    def _prompt_chunks(self, reading: list[Sequence], budget: int,
                       with_pending: bool = True) -> dict[Sequence, tuple[int, bool]]:
        """Prompt tokens each reading request feeds this step, and whether the chunk ends with the
        pending token (``with_pending``: the chunk that finishes a prompt does, so its logits give
        the first token; else the pending token waits for the first drafts). The oldest reading
        request gets at least ``1 / OLDEST_SHARE`` of the budget, so a long prompt always moves;
        the rest goes to the prompts nearest their end first, so a short prompt does not wait
        behind a long one."""
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
        lengths = allocate(requests, other, self.cost, self.max_step_tokens, self.runner.pass_shape)
        return {**lengths, **fixed}

    def _judge_unsent(self, s: Sequence) -> None:
        """Score a draft that was not sent as verification would have (``policy.judge_unsent``)."""
        judged = judge_unsent(s.context, *s.unsent)
        if judged is not None:
            if s.policy is None:
                s.acceptance.observe(len(s.unsent[1]), judged)
            else:
                s.policy.observe_unsent(len(s.unsent[1]), judged)
            s.unsent = None

    def _draft_unsent(self, s: Sequence) -> None:
        """A draft a lone request's policy did not send, after the context this step started from,
        to be judged by the tokens emitted (its time counts as overhead, not as drafting)."""
        room_left = min(s.config.draft_len, s.output.left - 1)
        if room_left > 0:
            tokens = s.drafter.propose(s.context, DraftPlan(room_left), s.config, s.generator).tokens
            s.unsent = (len(s.context), tokens) if tokens else None

    def _advance(self, s: Sequence, draft: Draft, logits: torch.Tensor, draft_s: float, pass_s: float,
                 target_tokens: int, allowed: int) -> tuple[Sequence, StreamEvent]:
        """Verify one request's rows, cut its slot back, emit its new tokens."""
        t2 = time.perf_counter()
        config = s.config
        settled = settle(draft, logits, config, s.noise, len(s.output.tokens))
        verdict = settled.verdict
        if draft.parents is None:  # the slot holds context[:-1] + [pending] + drafted: keep the accepted ones
            self.runner.truncate(s.slot, len(s.context) + verdict.num_accepted)
        elif isinstance(self.runner, TreeBatchRunner):  # ... + [pending] + the tree: keep the accepted branch
            self.runner.keep_branch(s.slot, len(s.context) - 1, settled.rows)
        else:
            raise RuntimeError(f"{type(self.runner).__name__} cannot keep a branch of a tree")
        if s.policy is not None and not allowed and s.unsent is None and s.policy.judges_unsent:
            self._draft_unsent(s)
        s.drafter.observe(draft, verdict.num_accepted)
        kept = set(settled.branch)
        if s.policy is not None:
            s.policy.observe_confidence(draft.path_scores(), [i in kept for i in range(len(draft))])
        else:
            if len(draft):
                s.acceptance.observe(draft.depth(), verdict.num_accepted)
            if draft.confidence:
                self.calibration.observe(draft.path_scores(), [i in kept for i in range(len(draft))])
        new, text = s.output.add(verdict.tokens)
        s.context.extend(new)
        if s.unsent is not None:
            self._judge_unsent(s)
        logprobs = emitted_logprobs(logits, settled, new, config)
        rec = step_record(s.stats.steps, allowed, draft, settled, len(new), draft_s, pass_s,
                          time.perf_counter() - t2, target_tokens)
        s.stats.add(rec)
        if s.policy is not None:
            s.policy.observe(rec)
        if s.trace is not None:
            s.trace.step(rec)
        finish = s.output.finish
        if finish is not None:
            s.stats.total_s = time.perf_counter() - s.started
            if s.trace is not None:
                s.trace.summary(s.stats, finish)
            self.cancel(s)
        return s, StreamEvent(text, new, rec, finish, s.stats if finish else None, s.seed, logprobs)
