"""``SpeculativeDecoder``: a loaded target, its tokenizer and a drafter, generating one request at
a time through the one decoding loop (``batching.engine.BatchEngine``) as a batch of one slot.

The prompt is read in chunks; the pass that reads its last one gives the first token. Then each
step (written once, in ``BatchEngine.step``):
  1. the request's policy plans the step (``DraftPlan``: tau and where to stop early); the drafter
     proposes up to tau tokens, a chain or a tree (``Draft.parents``);
  2. the target scores ``[pending] + drafted`` in one forward pass -> tau + 1 distributions (a
     tree: every node, in one pass);
  3-5. ``step.settle`` accepts a prefix and adds the target's own token (the coupled rule: what
     plain decoding with the request's seed emits, so the output does not depend on the drafts);
  6. the target's cache is cut back to the accepted context or branch (the drafter syncs its own
     cache at its next proposal), stop conditions are applied, new text is streamed.

"pending" is the last token of the context: emitted but not yet fed to the target. Feeding it
together with the drafted block is what lets one pass score every drafted position and the bonus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .batching.engine import BatchEngine
from .config import ConfigError, GenerationConfig
from .costmodel import CostModel
from .drafters.base import Drafter
from .policy import Calibration, policy_maker
from .runners import make_runner, output_rows
from .runners.base import OneSlot
from .stats import RunStats
from .step import StreamEvent
from .text import chat_token_ids, eos_token_ids

__all__ = ["GenerationResult", "SpeculativeDecoder", "StreamEvent"]


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
        # (config, drafter) -> what plans a request's steps, over that cost curve and calibration,
        # here and in a batch engine over this target (the output does not depend on the plans)
        self.policy = policy_maker(self.cost, self.calibration)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._engine: BatchEngine | None = None  # the one-slot engine, made at the first request

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
        engine = self.engine()
        seq = engine.add(prompt_ids, config or GenerationConfig(), trace=trace)
        try:
            while True:
                for _, event in engine.step():
                    yield event
                    if event.finish_reason is not None:
                        return
        finally:
            engine.cancel(seq)  # a stream closed early leaves its slot (and keeps its cache)

    def engine(self) -> BatchEngine:
        """The decoding loop over this decoder's target as one slot (``runners.base.OneSlot``),
        each request planned by its own policy; made once, so what a request left in the cache
        serves the next one that shares its prefix."""
        if self._engine is None:
            self._engine = BatchEngine(OneSlot(self.target, self.max_context), self.tokenizer, self.eos_ids,
                                       lambda: self.drafter, vocab_size=self.vocab_size, policy_for=self.policy,
                                       holder="the model's context")
        return self._engine
