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

    def propose(self, context, max_tokens, config, generator) -> Draft:
        if max_tokens <= 0 or len(context) < 2:
            return Draft([])
        self._update_index(context)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            start = self._latest.get(tuple(context[-n:]))
            if start is not None:
                follow = context[start + n : start + n + max_tokens]
                return Draft(follow, None, [1.0] * len(follow))
        return Draft([])
