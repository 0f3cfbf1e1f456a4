"""The decoding loop: requests in the slots of a batch runner, one target pass per step. A lone
request (``SpeculativeDecoder.stream``: ``generate``, ``bench``, ``check``, ``serve --max-batch 1``)
is a batch of one slot over any runner (``runners.base.OneSlot``); the server's requests share the
slots of a runner that batches. Each request is planned by its own policy (``plan.Planner``).

One step:
  1. every decoding request drafts after its context (its own drafter and state): as its policy
     plans while it has the pass to itself (tau, trees, where a confident drafter stops); beside
     others, under the ``cost`` policy, as deep as its draft length (a drafter that costs, the
     trained head, only as deep as the verification budget may send);
  2. requests still reading their prompt get a chunk of it, from what the step's token budget
     leaves (``max_step_tokens``; ``plan.prompt_chunks``), so a long prompt never stalls the others
     and can be cancelled between chunks; the chunk that finishes a prompt carries the pending
     token, and so the request's first token comes from the same pass;
  3. a request alone sends its whole draft; beside others the verification budget
     (``budget.allocate``) decides how many drafted tokens each ``cost`` request sends (a chain's
     first ones, a tree's likeliest candidates); the target scores every request's ``[pending] +
     drafted`` block in one pass (ragged lengths and ragged cache lengths: each request in its own
     slot; chains beside trees on the torch runner);
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
from ..drafters.base import Draft
from ..policy import policy_maker
from ..runners.base import Batchable, BatchRunner, Block, TreeBatchRunner, common_prefix
from ..stats import RunStats
from ..step import (
    StreamEvent,
    admit,
    emitted_logprobs,
    settle,
    step_record,
)
from .budget import PassCost
from .plan import Planner, Sequence, StepPlan


class BatchEngine:
    """Requests in up to ``runner.slots`` slots of a batch runner; ``step`` advances all of them."""

    def __init__(self, runner: BatchRunner, tokenizer, eos_ids: set[int], new_drafter,
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, cost: PassCost | None = None,
                 vocab_size: int | None = None, policy_for=None, holder: str = "a slot's context"):
        """``vocab_size``: the logits' columns (None: the tokenizer's tokens). ``policy_for``:
        (config, drafter) -> the ``Policy`` that plans a request's steps (None: policies over a
        cost curve of this engine's own, ``policy.policy_maker``). ``cost``: the prices of a pass
        shared by several requests (None: timed now, where there are several slots).
        ``holder``: what a request's tokens must fit in, as errors name it."""
        self.runner, self.tokenizer, self.eos_ids = runner, tokenizer, eos_ids
        self.vocab_size = vocab_size or len(tokenizer)
        self.new_drafter = new_drafter  # () -> a fresh drafter for one request
        if not runner.slots < max_step_tokens <= MAX_BLOCK:  # every running request's token, and a prompt's
            raise ConfigError("max_step_tokens", f"must be in [{runner.slots + 1}, {MAX_BLOCK}] with "
                                                 f"{runner.slots} slots (got {max_step_tokens})")
        self.max_step_tokens = max_step_tokens
        self.max_context = runner.capacity  # 0: no limit but the model's
        self.holder = holder
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._ids = count()
        if cost is None and runner.slots > 1:
            cost = PassCost.measure(self._time_pass)
        self.policy_for = policy_for or policy_maker()
        self.planner = Planner(cost, runner.pass_shape, max_step_tokens, self.max_context)

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
                   vocab_size=decoder.vocab_size, policy_for=decoder.policy)

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
        if not self.free_slots:
            raise RuntimeError("no free slot: one request at a time per slot (finish or close the other stream)")
        slot, reused = self._slot_for(prompt_ids)
        self.runner.truncate(slot, reused)
        drafter = self.new_drafter()
        policy = self.policy_for(let_in.config, drafter)
        seq = Sequence(next(self._ids), slot, let_in.config, list(prompt_ids), drafter, policy, let_in.output,
                       let_in.seed, RunStats(drafter=drafter.name, policy=policy.name, prompt_tokens=len(prompt_ids)),
                       len(prompt_ids), time.perf_counter(), torch.Generator().manual_seed(let_in.seed), let_in.noise,
                       trace=trace, read=reused)
        drafter.attach(self.runner.slot_runner(slot))
        if trace is not None:
            trace.header(config=let_in.config, drafter=drafter.name, policy=policy.name,
                         prompt_tokens=len(prompt_ids), seed=let_in.seed)
        self.running[slot] = seq
        return seq

    def _slot_for(self, prompt_ids: list[int]) -> tuple[int, int]:
        """A free slot for a prompt, and how many of the prompt's tokens its cache already holds.
        A slot keeps what its last request left (prefix caching): the free slot sharing the
        longest prefix with the prompt (a chat template's system turn, a conversation's earlier
        turns) reads only the rest; on a tie the lowest, as llama.cpp takes a run of consecutive
        slots into one micro-batch. The prompt's last token is always left to read: it is the
        pending token, whose logits give the first output."""
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
        room = self.max_step_tokens - len(decoding)  # after every running request's pending token
        plan = self.planner.plan(decoding, [s for s in seqs if s.reading_prompt], room)
        sent, chunks = plan.sent, plan.chunks
        t1 = time.perf_counter()
        blocks = [Block(s.slot, [s.context[-1]] + sent[s.slot].tokens, len(sent[s.slot]) + 1,
                        None if sent[s.slot].parents is None else [-1] + [p + 1 for p in sent[s.slot].parents])
                  for s in decoding]
        for s, (n, carries_pending) in chunks.items():
            blocks.append(Block(s.slot, s.context[s.read:s.read + n], int(carries_pending)))
        t_pass = time.perf_counter()
        logits = self.runner.forward(blocks)
        pass_s = time.perf_counter() - t_pass
        self.planner.observe_pass({b.slot: len(b.tokens) for b in blocks}, pass_s)
        events = []
        for s, (n, carries_pending) in chunks.items():
            s.read += n
            if not s.reading_prompt:
                s.stats.prefill_s = time.perf_counter() - s.started
            if carries_pending:  # the last chunk held the pending token too: its logits give the first token
                events.append(self._advance(s, Draft([]), logits[s.slot], plan, t1 - t0, pass_s, prompt=n))
        for s in decoding:
            events.append(self._advance(s, sent[s.slot], logits[s.slot], plan, t1 - t0, pass_s))
        return events

    def _advance(self, s: Sequence, draft: Draft, logits: torch.Tensor, plan: StepPlan, draft_s: float,
                 pass_s: float, prompt: int = 0) -> tuple[Sequence, StreamEvent]:
        """Verify one request's rows, cut its slot back, emit its new tokens (``prompt``: the
        prompt tokens its block read, where it finished reading the prompt)."""
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
        self.planner.settled(s, draft, settled, plan)
        s.drafter.observe(draft, verdict.num_accepted)
        new, text = s.output.add(verdict.tokens)
        s.context.extend(new)
        logprobs = emitted_logprobs(logits, settled, new, config)
        rec = step_record(s.stats.steps, plan.allowed.get(s.slot, 0), draft, settled, len(new), draft_s, pass_s,
                          time.perf_counter() - t2, prompt)
        s.stats.add(rec)
        self.planner.emitted(s, rec, plan)
        if s.trace is not None:
            s.trace.step(rec)
        finish = s.output.finish
        if finish is not None:
            s.stats.total_s = time.perf_counter() - s.started
            if s.trace is not None:
                s.trace.summary(s.stats, finish)
            self.cancel(s)
        return s, StreamEvent(text, new, rec, finish, s.stats if finish else None, s.seed, logprobs)
