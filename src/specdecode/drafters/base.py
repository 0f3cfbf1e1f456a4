"""The contract between the decoding loop and every drafter.

Two methods, as in Hugging Face's candidate generators: ``propose`` drafts after a context as far
as the step's ``DraftPlan`` allows, ``observe`` learns from how many drafted tokens the target
accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import GenerationConfig


def verify_all(scores: list[float]) -> int:
    """A tree size rule that verifies every candidate."""
    return len(scores)


@dataclass(frozen=True)
class DraftPlan:
    """What the loop allows one proposal, decided by the policy before it (``policy.Policy.plan``)."""

    max_tokens: int  # tau: at most this many tokens in a chain, at most this deep in a tree
    # drafters that report confidences end a chain (or stop expanding a tree path) once the product
    # of their confidences falls below this; 0 means draft all ``max_tokens``
    path_floor: float = 0.0
    # how many of a tree's candidates to send to verification, given their path probabilities best first
    tree_size: Callable[[list[float]], int] = verify_all
    # sampling only: drafted token i -> the Gumbel noise ``[vocab]`` of its output position, the
    # noise the target's own token there is drawn with (``verify.verify_tree_coupled``). A sampling
    # drafter draws its token i as that noise's Gumbel-max of its own distribution
    # (``sampling.draw``), so where its distribution is close to the target's it proposes the very
    # token the target will draw (drafter-invariant speculative decoding, Daliri et al. 2024).
    # None: draw from the generator
    noise: Callable[[int], torch.Tensor] | None = None
    # sampling only: return each drafted token's distribution (``Draft.probs``). The coupled rule
    # every request is settled by does not read them; the standard rule (``verify.verify``), the
    # reference it is held to, does. Off, a sampling drafter builds no [tau, vocab] tensor a step
    keep_probs: bool = False


@dataclass
class Draft:
    tokens: list[int]
    # [len(tokens), vocab]: the exact distribution each token was drawn from, where the plan asked
    # for it (``DraftPlan.keep_probs``). None otherwise, and where every token was drawn from a
    # one-hot distribution on itself (greedy drafts, n-gram lookup).
    probs: torch.Tensor | None = None
    # the drafter's own probability of each drafted token; empty when it has none (n-gram lookup)
    confidence: list[float] = field(default_factory=list)
    # None: the tokens form a chain, each continuing the one before. A list: they form a tree
    # of one-hot candidates (``probs`` None), ``parents[i]`` being the index of token i's parent, -1
    # for the pending token; parents come first, and ``confidence`` is then each token's
    # probability given its parent
    parents: list[int] | None = None

    def prune(self, n: int) -> "Draft":
        """The first ``n`` tokens of a chain; of a tree, the ``n`` candidates with the highest path
        scores (ties to the earlier one). A node never scores above its parent, so they are a tree
        again, in the same order."""
        if n >= len(self.tokens):
            return self
        if n <= 0:
            return Draft([])
        if self.parents is None:
            return Draft(self.tokens[:n], None if self.probs is None else self.probs[:n], self.confidence[:n])
        scores = self.path_scores() if self.confidence else [0.0] * len(self.tokens)
        keep = sorted(sorted(range(len(self.tokens)), key=lambda i: (-scores[i], i))[:n])
        where = {old: new for new, old in enumerate(keep)}
        where[-1] = -1
        confidence = [self.confidence[i] for i in keep] if self.confidence else []
        return Draft([self.tokens[i] for i in keep], None, confidence, parents=[where[self.parents[i]] for i in keep])

    def path_scores(self) -> list[float]:
        """The drafter's probability of the whole path up to each token (product of confidences)."""
        out: list[float] = []
        for i, c in enumerate(self.confidence):
            parent = i - 1 if self.parents is None else self.parents[i]
            out.append(c * (out[parent] if parent >= 0 else 1.0))
        return out

    def first_confidence(self) -> float:
        """The drafter's probability of its likeliest first token (a tree's best root); 1.0 when
        it gives no confidence (n-gram lookup)."""
        if not self.confidence:
            return 1.0
        if self.parents is None:
            return self.confidence[0]
        return max(c for c, p in zip(self.confidence, self.parents) if p < 0)

    def depth(self) -> int:
        """Tokens on the longest path: the chain's length, or the tree's depth."""
        if self.parents is None:
            return len(self.tokens)
        depths: list[int] = []
        for p in self.parents:
            depths.append(depths[p] + 1 if p >= 0 else 1)
        return max(depths, default=0)

    def __len__(self) -> int:
        return len(self.tokens)


class Drafter:
    """Base class. ``name`` appears in stats and traces."""

    name = "drafter"
    # Per-token drafting cost as a fraction of the target's one-token pass; the cost-aware policy
    # measures it online, this is only its prior.
    cost_prior = 0.0
    # True for drafters whose per-token confidence tracks how likely the target is to accept the
    # token (trained heads, draft models): the cost policy then lets them end a block early, at
    # ``DraftPlan.path_floor``
    dynamic = False
    # True for drafters whose drafts are one-hot and cost next to nothing (n-gram lookup): a draft
    # the policy does not send can still be proposed and judged against the tokens then emitted
    # (``policy.judge_unsent``), so the policy needs no probe passes to follow the text
    judged_unsent = False

    def propose(self, context: list[int], plan: DraftPlan, config: GenerationConfig,
                generator: torch.Generator) -> Draft:
        """Draft after ``context`` (token ids, the last one pending: emitted, not yet scored by the
        target) within ``plan``; sampled drafts draw with ``plan.noise`` where it is given, else
        from ``generator``, and carry the distribution each token was drawn from."""
        raise NotImplementedError

    def observe(self, draft: Draft, num_accepted: int) -> None:
        """Called after verification with how many of ``draft`` were accepted."""

    def reset(self) -> None:
        """Forget per-request state (caches, indexes)."""

    def attach(self, target_runner) -> None:
        """Called once with the target's runner, for drafters that read the target's features."""

    def spawn(self) -> "Drafter | None":
        """A fresh drafter with these settings and weights and none of this one's per-request state
        (one per request of a batch, ``batching.BatchEngine``), not yet attached; None where this
        drafter cannot be copied so (a draft model with its own runner)."""
        return None


class NoDrafter(Drafter):
    """Proposes nothing: every step is one plain target pass. The baseline for every speed figure,
    run through the same loop as speculation so the comparison measures speculation alone."""

    name = "none"

    def spawn(self) -> "NoDrafter":
        return NoDrafter()

    def propose(self, context, plan, config, generator) -> Draft:
        return Draft([])
