"""The decoding loop: the one place that calls drafter, target, verifier and policy in order.

One step:
  1. the policy plans the step (``DraftPlan``: tau and where to stop early); the drafter proposes
     up to tau tokens;
  2. the target scores ``[pending] + drafted`` in one forward pass -> tau + 1 distributions;
  3-5. ``step.settle`` accepts a prefix and adds the target's own token (the coupled rule: what
     plain decoding with the request's seed emits, so the output does not depend on the drafts);
  6. the target's cache is cut back to the accepted context (the drafter syncs its own cache at
     its next proposal), stop conditions are applied, new text is streamed.

A drafter may propose a tree instead of a chain (``Draft.parents``): the target scores all its
branches in one pass, the rule walks down it, and the target's cache keeps the accepted branch only.

"pending" is the last token of the context: emitted but not yet fed to the target. Feeding it
together with the drafted block is what lets one pass score every drafted position and the bonus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .config import ConfigError, GenerationConfig
from .costmodel import CostModel
from .drafters.base import Draft, Drafter, DraftPlan
from .policy import Calibration, judge_unsent, make_policy
from .runners import TreeRunner, make_runner, output_rows
from .sampling import TokenLogprob
from .stats import RunStats, StepRecord
from .step import admit, draw_seed, emitted_logprobs, new_output, request_noise, settle, step_record, with_noise
from .text import chat_token_ids, eos_token_ids


@dataclass
class StreamEvent:
    text: str  # new text since the previous event (may be empty while a stop string is pending)
    token_ids: list[int]  # new token ids
    step: StepRecord | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last event
    stats: RunStats | None = None  # on the last event
    seed: int | None = None  # the seed the generation ran with (drawn when none was given), for reproducing it
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked for


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RunStats
    prompt_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_token_ids),
            "seed": self.seed,
            "stats": self.stats.to_json(),
        }


class SpeculativeDecoder:
    """Holds a loaded target and a drafter; generates many times.

    Not thread-safe: one generation at a time per instance (the caches are shared state). The
    server serialises requests through a worker for this reason.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, drafter: Drafter, cost: CostModel | None = None,
                 fast: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.vocab_size = min(output_rows(model), max(len(tokenizer), 1))
        self.target = make_runner(model, vocab_size=self.vocab_size, fast=fast)
        drafter.attach(self.target)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.cost = cost or CostModel()  # shared across calls: what was measured stays measured
        self.calibration = Calibration()  # how far the drafter's confidence is to be trusted, likewise
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = True) -> list[int]:
        """Token ids of a prompt: a string (chat template applied when the tokenizer has one and
        ``chat`` is true), a list of chat messages, or a list of token ids."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return list(prompt)
        if isinstance(prompt, list):
            messages = prompt
            if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) \
                    or not any(m["content"].strip() for m in messages):
                raise ConfigError("messages", "must be a non-empty list of {role, content} with string content, "
                                              "not all of it empty")
            chat = True
        else:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError("prompt", "must be a non-empty string")
            messages = [{"role": "user", "content": prompt}]
        if chat and getattr(self.tokenizer, "chat_template", None):
            return chat_token_ids(self.tokenizer, messages)
        if isinstance(prompt, list):
            text = "\n".join(m["content"] for m in messages)
        else:
            text = prompt
        return list(self.tokenizer(text).input_ids)

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self, prompt, config: GenerationConfig | None = None, *, chat: bool = True, trace=None
    ) -> GenerationResult:
        prompt_ids = self.encode(prompt, chat)
        text, ids, last = [], [], None
        for event in self.stream(prompt_ids, config, trace=trace):
            text.append(event.text)
            ids.extend(event.token_ids)
            last = event
        return GenerationResult("".join(text), ids, last.finish_reason, last.stats, prompt_ids, last.seed)

    def stream(
        self, prompt, config: GenerationConfig | None = None, *, chat: bool = True, trace=None
    ) -> Iterator[StreamEvent]:
        """Yield text as it is accepted. The last event carries ``finish_reason`` and ``stats``."""
        prompt_ids = self.encode(prompt, chat)
        config = admit(prompt_ids, config or GenerationConfig(), self.max_context, "the model's context")
        seed = draw_seed(config)
        noise = request_noise(config, seed, self.vocab_size)
        generator = torch.Generator().manual_seed(seed)  # what a drafter draws from without noise
        # the output does not depend on the plans (``step``): they are free to follow timings
        policy = make_policy(
            config.policy, config.draft_len, self.cost, dynamic=self.drafter.dynamic, calibration=self.calibration,
            judges_unsent=self.drafter.judged_unsent,
        )
        unsent = None  # (context length, tokens) of a draft the policy did not send, to be judged
        stats = RunStats(drafter=self.drafter.name, policy=policy.name, prompt_tokens=len(prompt_ids))
        output = new_output(self.tokenizer, self.eos_ids, config)
        if trace is not None:
            trace.header(
                config=config, drafter=self.drafter.name, policy=policy.name, prompt_tokens=len(prompt_ids), seed=seed
            )

        t_start = time.perf_counter()
        context = list(prompt_ids)
        cached = self.target.sync(context[:-1])
        if cached < len(context) - 1:
            self.target.forward(context[cached:-1], num_logits=0)  # prefill, pending token held back
        stats.prefill_s = time.perf_counter() - t_start
        step = 0
        while True:
            t0 = time.perf_counter()
            room = self.max_context - len(context) if self.max_context else None  # tree tokens that fit
            at = len(output.tokens)  # the output position the pending token's row decides
            plan = with_noise(policy.plan(output.left, room), noise, at)
            draft = self.drafter.propose(context, plan, config, generator) if plan.max_tokens else Draft([])
            t1 = time.perf_counter()
            if draft.parents is None:
                logits = self.target.forward([context[-1]] + draft.tokens, num_logits=len(draft) + 1)  # [tau+1, V]
            elif isinstance(self.target, TreeRunner):  # a tree of one-hot candidates: the pending token is its root
                logits = self.target.forward_tree([context[-1]] + draft.tokens, [-1] + [p + 1 for p in draft.parents])
            else:
                raise RuntimeError(f"drafter {self.drafter.name} proposed a tree for a target runner without tree "
                                   "passes")
            settled = settle(draft, logits, config, noise, at)
            if draft.parents is None:  # the cache holds context + all drafted tokens: keep the accepted ones
                self.target.truncate(len(context) + settled.verdict.num_accepted)
            else:
                self.target.keep_branch(len(context) - 1, settled.rows)
            t2 = time.perf_counter()
            if not plan.max_tokens and unsent is None and policy.judges_unsent:
                # a draft it does not send, after the context this step started from, judged below by
                # the tokens emitted (its time counts as overhead, not as drafting)
                room_left = min(config.draft_len, output.left - 1)
                if room_left > 0:
                    tokens = self.drafter.propose(context, DraftPlan(room_left), config, generator).tokens
                    unsent = (len(context), tokens) if tokens else None
            self.drafter.observe(draft, settled.verdict.num_accepted)
            hit = set(settled.branch)
            policy.observe_confidence(draft.path_scores(), [i in hit for i in range(len(draft))])

            new, text_delta = output.add(settled.verdict.tokens)
            finish = output.finish
            logprobs = emitted_logprobs(logits, settled, new, config)
            context.extend(new)
            if unsent is not None and (judged := judge_unsent(context, *unsent)) is not None:
                policy.observe_unsent(len(unsent[1]), judged)
                unsent = None
            rec = step_record(step, plan.max_tokens, draft, settled, len(new), t1 - t0, t2 - t1,
                              time.perf_counter() - t2, len(draft) + 1)
            stats.add(rec)
            policy.observe(rec)
            if trace is not None:
                trace.step(rec)
            step += 1
            if finish is not None:
                stats.total_s = time.perf_counter() - t_start
                if trace is not None:
                    trace.summary(stats, finish)
                yield StreamEvent(text_delta, new, rec, finish, stats, seed, logprobs)
                return
            yield StreamEvent(text_delta, new, rec, seed=seed, logprobs=logprobs)
