"""Prompt-lookup drafting (n-gram matching in the context; Saxena 2023, "Prompt Lookup Decoding").

No model: find the most recent earlier occurrence of the context's last n tokens (n from
``max_ngram`` down to ``min_ngram``) and propose the tokens that followed it. Summaries, code edits
and retrieval answers copy long spans of their prompt, which is where this pays.
Drafts are one-hot, so under sampling a drafted token x is accepted with probability target(x).
"""

from __future__ import annotations

from .base import Draft, Drafter


class NgramDrafter(Drafter):
    name = "ngram"
    judged_unsent = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._indexed: list[int] = []  # the context the index was built over
        # n-gram tuple -> start of its latest occurrence that has at least one token after it
        self._latest: dict[tuple[int, ...], int] = {}

    def reset(self) -> None:
        self._indexed = []
        self._latest = {}

    def spawn(self) -> "NgramDrafter":
        return NgramDrafter(self.max_ngram, self.min_ngram)

    def _update_index(self, context: list[int]) -> None:
        """Index every n-gram that ends before the last token; incremental while the context only grows."""
        old = len(self._indexed)
        if self._indexed != context[:old]:
            self.reset()
            old = 0
        # an n-gram starting at s ending at s+n-1 is indexable once s+n < len(context)
        for end in range(max(old - 1, 0), len(context) - 1):  # end: index of the n-gram's last token
            for n in range(self.min_ngram, self.max_ngram + 1):
                start = end - n + 1
                if start >= 0:
                    self._latest[tuple(context[start : end + 1])] = start
        self._indexed = list(context)

    def match(self, context: list[int], max_tokens: int) -> tuple[int, list[int]]:
        """The longest n (max_ngram..min_ngram) whose last-n-token suffix occurred before, and up to
        ``max_tokens`` tokens that followed it; (0, []) when there is none."""
        if max_tokens <= 0 or len(context) < 2:
            return 0, []
        self._update_index(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            start = self._latest.get(tuple(context[-n:]))
            if start is not None:
                return n, context[start + n : start + n + max_tokens]
        return 0, []

    def propose(self, context, plan, config, generator) -> Draft:
        _, follow = self.match(context, plan.max_tokens)
        return Draft(follow)  # one-hot, and no confidence to calibrate


class HybridDrafter(Drafter):
    """A long n-gram match when the context has one (copying a span of the prompt), else the
    trained head - or a shorter match's continuation where its first token has been right more
    often in this request than the head is sure of its own. Each step's draft is verified against
    the distribution it came from, so mixing drafters step by step keeps the output exact."""

    def __init__(self, head: Drafter, ngram: NgramDrafter | None = None, min_match: int = 3, ngram_tokens: int = 4,
                 prior: float = 0.5, prior_weight: float = 2.0):
        self.head, self.min_match = head, min_match
        self.ngram = ngram or NgramDrafter(max_ngram=max(3, min_match), min_ngram=1)
        # a copied span carries no confidence to end it early, so its block is capped: a pass
        # over up to about 5 tokens costs little more than a 1-token one on a CPU
        self.ngram_tokens = ngram_tokens
        # shorter matches (1 .. min_match - 1 tokens) are scored at every step, used or not: how
        # often the token that followed a match of each length was the one that came next, starting
        # from ``prior`` as if seen ``prior_weight`` times
        self.prior, self.prior_weight = prior, prior_weight
        self.name = f"{head.name}+ngram"
        self.cost_prior = head.cost_prior
        self.dynamic = head.dynamic
        self.reset()

    def attach(self, target_runner) -> None:
        self.head.attach(target_runner)

    def spawn(self) -> "HybridDrafter | None":
        head = self.head.spawn()
        return None if head is None else HybridDrafter(head, self.ngram.spawn(), self.min_match, self.ngram_tokens,
                                                       self.prior, self.prior_weight)

    def reset(self) -> None:
        self.head.reset()
        self.ngram.reset()
        self._pending: tuple[int, int, int] | None = None  # (context length, match length, token it offered)
        self._hits: dict[int, int] = {}
        self._tries: dict[int, int] = {}

    def match_rate(self, n: int) -> float:
        """How often, in this request so far, an ``n``-token match's next token came next."""
        return (self._hits.get(n, 0) + self.prior * self.prior_weight) / (self._tries.get(n, 0) + self.prior_weight)

    def _score_pending(self, context: list[int]) -> None:
        if self._pending is not None and len(context) > self._pending[0]:
            at, n, token = self._pending
            self._tries[n] = self._tries.get(n, 0) + 1
            self._hits[n] = self._hits.get(n, 0) + (context[at] == token)
        self._pending = None

    def propose(self, context, plan, config, generator) -> Draft:
        self._score_pending(context)
        n, follow = self.ngram.match(context, min(plan.max_tokens, self.ngram_tokens))
        if n >= self.min_match and follow:
            return Draft(follow)  # one-hot, and no confidence to calibrate
        draft = self.head.propose(context, plan, config, generator)
        if not follow:
            return draft
        self._pending = (len(context), n, follow[0])
        if len(draft) and self.match_rate(n) > draft.first_confidence():
            return Draft(follow)
        return draft

    def observe(self, draft: Draft, num_accepted: int) -> None:
        self.head.observe(draft, num_accepted)
