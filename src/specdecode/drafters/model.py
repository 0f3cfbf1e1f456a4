"""A small causal LM that shares the target's tokenizer drafts tokens one after another.

It keeps its own KV cache. Before each proposal the cache is synced to the context (longest common
prefix kept, the rest fed in one pass), so after a rejection it is cut back to the accepted tokens
and after a full acceptance it catches up on the last drafted token and the bonus token.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..runners import make_runner
from ..sampling import draw, logits_to_probs
from .base import Draft, Drafter


def check_same_vocabulary(target_tokenizer, draft_tokenizer, param: str = "draft") -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ConfigError(
            param,
            "the draft model's tokenizer differs from the target's "
            f"({len(draft_tokenizer)} vs {len(target_tokenizer)} tokens, or different ids); "
            "a draft model must share the target's vocabulary",
        )


class ModelDrafter(Drafter):
    name = "model"
    cost_prior = 0.1  # a drafted token costs about a tenth of a target pass, before it is measured
    dynamic = True

    def __init__(self, model: torch.nn.Module, vocab_size: int, name: str = "model", fast: bool = True):
        self.model = model  # the module itself, for tools that run it another way (bench --compare hf)
        self.runner = make_runner(model, vocab_size=vocab_size, fast=fast)
        self.name = name

    def reset(self) -> None:
        self.runner.reset()

    def propose(self, context, plan, config, generator) -> Draft:
        max_tokens = plan.max_tokens
        if max_tokens <= 0:
            return Draft([])
        cached = self.runner.sync(context[:-1]) if len(context) > 1 else 0
        logits = self.runner.forward(context[cached:], num_logits=1)[0]
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        confidence: list[float] = []
        path = 1.0
        for i in range(max_tokens):
            dist = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)  # [vocab]
            token = int(dist.argmax()) if config.greedy else draw(dist, generator, plan.noise and plan.noise(i))
            if config.greedy:
                top = float(torch.softmax(logits, dim=-1).max())
            else:
                top = float(dist.max())
            tokens.append(token)
            if plan.keep_probs and not config.greedy:
                probs.append(dist)
            confidence.append(top)
            path *= top
            if i + 1 == max_tokens or top < config.confidence_floor or path < plan.path_floor:
                break
            logits = self.runner.forward([token], num_logits=1)[0]
        # greedy draws are one-hot on the drafted token: no need to carry the distributions
        return Draft(tokens, torch.stack(probs) if probs else None, confidence)
