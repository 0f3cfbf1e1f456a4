"""The decoding loop: the one place that calls drafter, target, verifier and policy in order.

One step (DEVELOPERS.md, steps 1-6):
  1. the policy picks tau; the drafter proposes up to tau tokens with their distributions;
  2. the target scores ``[pending] + drafted`` in one forward pass -> tau + 1 distributions;
  3-5. ``verify`` accepts a prefix and adds the target's recovered or bonus token;
  6. the target's cache is cut back to the accepted context (the drafter syncs its own cache at
     its next proposal), stop conditions are applied, new text is streamed.

A drafter may propose a tree instead of a chain (``Draft.parents``): the target scores all its
branches in one pass, ``verify_tree`` walks down it (the target's argmax under greedy decoding,
sequential rejection of one-hot candidates under sampling), and the target's cache keeps the
accepted branch only.

"pending" is the last token of the context: emitted but not yet fed to the target. Feeding it
together with the drafted block is what lets one pass score every drafted position and the bonus.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .config import ConfigError, GenerationConfig
from .drafters.base import Draft, Drafter
from .costmodel import CostModel
from .policy import Calibration, make_policy
from .runner import make_runner
from .sampling import logits_to_probs
from .stats import RunStats, StepRecord
from .verify import verify, verify_tree


@dataclass
class StreamEvent:
    text: str  # new text since the previous event (may be empty while a stop string is pending)
    token_ids: list[int]  # new token ids
    step: StepRecord | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last event
    stats: RunStats | None = None  # on the last event


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


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat template applied to ``messages``, with the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


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
        self.vocab_size = min(model.get_output_embeddings().weight.shape[0], max(len(tokenizer), 1))
        self.target = make_runner(model, vocab_size=self.vocab_size, fast=fast)
        drafter.attach(self.target)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.cost = cost or CostModel()  # shared across calls: what was measured stays measured
        self.calibration = Calibration()  # how far the drafter's confidence is to be trusted, likewise
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.last_seed: int | None = None  # the seed of the latest call, for reproducing it

    # ---- prompts -------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = True) -> list[int]:
        """Token ids of a prompt: a string (chat template applied when the tokenizer has one and
        ``chat`` is true), a list of chat messages, or a list of token ids."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return list(prompt)
        if isinstance(prompt, list):
            messages = prompt
            if not messages or not all(isinstance(m, dict) and m.get("content") for m in messages):
                raise ConfigError("messages", "must be a non-empty list of {role, content} with non-empty content")
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
    def generate(self, prompt, config: GenerationConfig | None = None, *, chat: bool = True, trace=None) -> GenerationResult:
        prompt_ids = self.encode(prompt, chat)
        text, ids, last = [], [], None
        for event in self.stream(prompt_ids, config, trace=trace):
            text.append(event.text)
            ids.extend(event.token_ids)
            last = event
        return GenerationResult("".join(text), ids, last.finish_reason, last.stats, prompt_ids, self.last_seed)

    def stream(self, prompt, config: GenerationConfig | None = None, *, chat: bool = True, trace=None) -> Iterator[StreamEvent]:
        """Yield text as it is accepted. The last event carries ``finish_reason`` and ``stats``."""
        config = (config or GenerationConfig()).validate()
        prompt_ids = self.encode(prompt, chat)
        if self.max_context and len(prompt_ids) + config.max_new_tokens > self.max_context:
            raise ConfigError(
                "max_new_tokens",
                f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({config.max_new_tokens}) "
                f"exceeds the model's context of {self.max_context} tokens",
            )
        seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.last_seed = seed
        generator = torch.Generator().manual_seed(seed)
        # Seeded sampling must not depend on timing noise or on earlier requests: plan with the
        # fixed prior cost curve and a fresh calibration. (Greedy output does not depend on the
        # draft lengths at all.)
        seeded = config.seed is not None and not config.greedy
        cost = CostModel.prior(self.drafter.cost_prior) if seeded else self.cost
        calibration = Calibration() if seeded else self.calibration
        policy = make_policy(config.policy, config.draft_len, cost, dynamic=self.drafter.dynamic, calibration=calibration)
        stats = RunStats(drafter=self.drafter.name, policy=policy.name, prompt_tokens=len(prompt_ids))
        stop = _StopMatcher(config.stop)
        decode = _Detokenizer(self.tokenizer)
        if trace is not None:
            trace.header(config=config, drafter=self.drafter.name, policy=policy.name, prompt_tokens=len(prompt_ids), seed=seed)

        t_start = time.perf_counter()
        context = list(prompt_ids)
        cached = self.target.sync(context[:-1])
        if cached < len(context) - 1:
            self.target.forward(context[cached:-1], num_logits=0)  # prefill, pending token held back
        stats.prefill_s = time.perf_counter() - t_start
        generated: list[int] = []
        step = 0
        while True:
            t0 = time.perf_counter()
            remaining = config.max_new_tokens - len(generated)
            tau = max(0, min(policy.choose(), remaining - 1))
            self.drafter.path_floor = policy.path_floor()
            room = self.max_context - len(context) if self.max_context else None  # tree tokens that fit
            self.drafter.tree_size = policy.tree_size if room is None else (lambda s, r=room: min(policy.tree_size(s), r))
            draft = self.drafter.propose(context, tau, config, generator) if tau else Draft([])
            t1 = time.perf_counter()
            if draft.parents is None:
                logits = self.target.forward([context[-1]] + draft.tokens, num_logits=len(draft) + 1)  # [tau+1, V]
                target_probs = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)
                verdict = verify(draft.tokens, draft.probs, target_probs, generator)
                accepted = list(range(verdict.num_accepted))
                # cache holds context + all drafted tokens; keep context + accepted ones
                self.target.truncate(len(context) + verdict.num_accepted)
            else:  # a tree of one-hot candidates: the pending token is its root
                if draft.probs is not None:
                    raise RuntimeError(f"drafter {self.drafter.name} proposed a tree with draft distributions")
                start = len(context) - 1
                logits = self.target.forward_tree([context[-1]] + draft.tokens, [-1] + [p + 1 for p in draft.parents])
                target_probs = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)
                accepted, verdict = verify_tree(draft.tokens, draft.parents, target_probs, generator)
                self.target.keep_branch(start, [0] + [i + 1 for i in accepted])
            t2 = time.perf_counter()
            self.drafter.observe(draft, verdict.num_accepted)
            hit = set(accepted)
            policy.observe_confidence(draft.path_scores(), [i in hit for i in range(len(draft))])

            new = verdict.tokens
            finish = None
            if not config.ignore_eos:
                for i, tok in enumerate(new):
                    if tok in self.eos_ids:
                        new, finish = new[: i + 1], "stop"
                        break
            before = len(generated)
            generated.extend(new)
            text_delta, stopped_at = decode.advance(generated, stop)
            if stopped_at is not None:  # a stop string completed: drop tokens after the one that completed it
                del generated[stopped_at:]
                new = generated[before:]
                finish = "stop"
            context.extend(new)
            if finish is None and len(generated) >= config.max_new_tokens:
                finish = "length"
            t3 = time.perf_counter()
            rec = StepRecord(step, tau, len(draft), verdict.num_accepted, len(new), t1 - t0, t2 - t1, t3 - t2,
                             len(draft) + 1, None if draft.parents is None else draft.depth())
            stats.add(rec)
            policy.observe(rec)
            if trace is not None:
                trace.step(rec)
            step += 1
            if finish is not None:
                stats.total_s = time.perf_counter() - t_start
                if trace is not None:
                    trace.summary(stats, finish)
                yield StreamEvent(text_delta + decode.flush(), new, rec, finish, stats)
                return
            yield StreamEvent(text_delta, new, rec)


class _StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, start: int) -> int | None:
        """Earliest index where a stop string begins at or after ``start`` - (longest - 1)."""
        lo = max(0, start - self.longest + 1)
        hits = [i for i in (text.find(s, lo) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Characters at the end of ``text`` that could be the start of a stop string."""
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class _Detokenizer:
    """Incremental text from growing token ids: never emits a partial UTF-8 character or text
    that may turn out to belong to a stop string."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sent = 0  # characters of the decoded text already emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def advance(self, generated: list[int], stop: _StopMatcher) -> tuple[str, int | None]:
        """Return (text safe to emit now, index in ``generated`` to cut at if a stop string completed)."""
        previous = len(self.text)
        self.text = self._decode(generated)
        if stop.stops:
            at = stop.find(self.text, previous)
            if at is not None:
                # the shortest prefix of tokens whose text contains the stop string
                cut = len(generated)
                while cut > 0 and stop.find(self._decode(generated[: cut - 1]), 0) is not None:
                    cut -= 1
                self.text = self.text[:at]
                out = self.text[self.sent :]
                self.sent = len(self.text)
                return out, cut
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1  # an incomplete multi-byte character; wait for its remaining bytes
        safe -= stop.holdback(self.text[:safe])
        out = self.text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out, None

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
