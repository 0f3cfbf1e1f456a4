"""Drafting with a trained draft head (``head.FeatureHead``) that reads the target's features:
chains token by token, or EAGLE-2's dynamic tree."""

from __future__ import annotations

import torch

from ..config import ConfigError, GenerationConfig
from ..runners import FeatureRunner, common_prefix
from ..sampling import draw, logits_to_probs
from .base import Draft, Drafter, DraftPlan
from .head import FeatureHead, TargetParts


class FeatureDrafter(Drafter):
    name = "head"
    cost_prior = 0.08
    dynamic = True

    def __init__(self, head: FeatureHead, parts: TargetParts, vocab_size: int, name: str = "head",
                 branches: int = 4, width: int = 4):
        self.head, self.parts, self.vocab_size, self.name = head, parts, vocab_size, name
        # greedy tree drafts: each expanded node offers its ``branches`` likeliest next tokens, and
        # each depth expands the ``width`` likeliest nodes of the depth before (one head step each)
        self.branches, self.width = branches, width
        self.target_runner = None
        self._cache = head.new_cache(256)
        # the context at the last proposal: the head's cache holds index i (fed with f_i and token
        # i+1) for i < len(_tokens) - 1; indices beyond hold drafted states, overwritten next time
        self._tokens: list[int] = []

    def attach(self, target_runner) -> None:
        if not isinstance(target_runner, FeatureRunner):
            raise ConfigError("draft", "a feature draft head needs a target runner that captures features: the lean "
                                       "Llama runner (Llama family, CPU or CUDA, not --no-fast)")
        target_runner.capture_layers(self.head.feature_layers)
        self.target_runner = target_runner
        self.reset()

    def reset(self) -> None:
        self._tokens = []

    def spawn(self) -> "FeatureDrafter":
        return FeatureDrafter(self.head, self.parts, self.vocab_size, self.name, self.branches, self.width)

    def _ensure(self, length: int) -> None:
        capacity = self._cache.shape[2]
        if length > capacity:
            grown = self.head.new_cache(max(length, 2 * capacity))
            grown[:, :, :capacity] = self._cache
            self._cache = grown

    @torch.inference_mode()
    def propose(self, context, plan, config, generator) -> Draft:
        max_tokens = plan.max_tokens
        n_ctx = len(context)
        if max_tokens <= 0 or n_ctx < 2:
            return Draft([])
        # index i is fed f_i and token i+1, so it stays valid while tokens 0..i+1 are unchanged
        # (the last index is always recomputed: its output is where drafting starts)
        start = max(0, min(common_prefix(self._tokens, context) - 1, n_ctx - 2))
        features = self.target_runner.features(start, n_ctx - 1)  # f_start .. f_{n-2}
        if features is None:
            return Draft([])
        self._ensure(n_ctx + max_tokens)
        embed, ids = self.parts.embed, self.parts.vocab_ids
        g = self.head.step(self.head.mix(features), embed[torch.tensor(context[start + 1:], dtype=torch.long)], start,
                           self._cache)[-1:]
        self._tokens = list(context)
        if config.drafts_tree:
            return self._propose_tree(g, n_ctx, plan, config)
        tokens, probs, confidence, path = [], [], [], 1.0
        for i in range(max_tokens):
            if i:
                g = self.head.step(g, embed[tokens[-1]][None], n_ctx - 2 + i, self._cache)
            logits = self.parts.logits(g[0]).float().cpu()  # [V']; sampling and the engine's arithmetic run on the CPU
            dist = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)
            top = float(torch.softmax(logits, -1).max()) if config.greedy else float(dist.max())
            pick = int(dist.argmax()) if config.greedy else draw(dist, generator, plan.noise and plan.noise(i)[ids])
            tokens.append(int(ids[pick]))
            confidence.append(top)
            if plan.keep_probs and not config.greedy:
                full = torch.zeros(self.vocab_size)
                full[ids] = dist
                probs.append(full)
            path *= top
            if top < config.confidence_floor or path < plan.path_floor:
                break
        return Draft(tokens, torch.stack(probs) if probs else None, confidence)

    def _propose_tree(self, g: torch.Tensor, n_ctx: int, plan: DraftPlan, config: GenerationConfig) -> Draft:
        """A tree of one-hot candidates (EAGLE-2's dynamic draft tree): depth by depth, the ``width``
        nodes with the highest path probability (the product of the head's probabilities from the
        root) that clear ``plan.path_floor`` (and whose own probability clears the confidence floor, under
        ``--policy confidence``) are expanded in one head step, each offering its ``branches``
        likeliest next tokens. Of all candidates, the ``plan.tree_size`` best by path probability are
        sent to verification - an ancestor always scores at least as high as its descendants, so
        the kept nodes form a tree. The head's probabilities are those of the run's sampling
        settings (its softmax under greedy decoding), as the target's acceptance of a candidate is
        its own probability of it (``verify_tree``)."""
        max_depth = plan.max_tokens
        confidence_floor = config.confidence_floor
        embed, ids = self.parts.embed, self.parts.vocab_ids
        tokens: list[int] = []
        parents: list[int] = []
        own: list[float] = []  # the head's probability of each node given its parent
        score: list[float] = []  # path probability from the root
        # nodes whose children exist: node -> cache slot of its head state; the root is the last
        # context index, whose state ``g`` predicts the first drafted token
        slot = {-1: n_ctx - 2}
        states = {-1: g[0]}
        frontier = [-1]
        next_slot = n_ctx - 1
        for depth in range(max_depth):
            logits = self.parts.logits(torch.stack([states[n] for n in frontier])).float().cpu()
            probs = (torch.softmax(logits, dim=-1) if config.greedy
                     else logits_to_probs(logits, config.temperature, config.top_k, config.top_p))
            top_p, top_i = probs.topk(min(self.branches, probs.shape[-1]), dim=-1)
            fresh = []
            for row, parent in enumerate(frontier):
                base = score[parent] if parent >= 0 else 1.0
                for p, i in zip(top_p[row].tolist(), top_i[row].tolist()):
                    if p <= 0.0:  # cut by top-k / top-p from the head's distribution
                        continue
                    fresh.append(len(tokens))
                    tokens.append(int(ids[i]))
                    parents.append(parent)
                    own.append(p)
                    score.append(base * p)
            if depth + 1 == max_depth:
                break
            frontier = sorted(fresh, key=lambda n: -score[n])[: self.width]
            frontier = [n for n in frontier if score[n] >= plan.path_floor and own[n] >= confidence_floor]
            if not frontier:
                break
            # one head step for the frontier: node n sits at index n_ctx - 2 + depth(n), fed its
            # parent's state and its own token, and attends to the context and its own branch
            k = len(frontier)
            self._ensure(next_slot + k)
            mask = torch.zeros(k, next_slot + k, dtype=torch.bool)
            mask[:, : n_ctx - 1] = True
            for row, n in enumerate(frontier):
                a = parents[n]
                while a >= 0:
                    mask[row, slot[a]] = True
                    a = parents[a]
                mask[row, next_slot + row] = True
            positions = torch.full((k,), n_ctx - 1 + depth, dtype=torch.long)
            out = self.head.step(torch.stack([states[parents[n]] for n in frontier]),
                                 embed[torch.tensor([tokens[n] for n in frontier], dtype=torch.long)],
                                 next_slot, self._cache, positions, mask)
            for row, n in enumerate(frontier):
                slot[n], states[n] = next_slot + row, out[row]
            next_slot += k
        tree = Draft(tokens, None, own, parents=parents)
        return tree.prune(plan.tree_size(sorted(score, reverse=True)))
