"""The attention layout of a token tree verified in one pass."""

from __future__ import annotations

import torch


class TreeLayout:
    """A block of k tokens that form a tree rather than a sequence: ``parents[i]`` is the index in
    the block of token i's parent (-1: its parent is the last cached token). Parents come before
    their children. Used to verify many drafted continuations in one pass (SpecInfer, Miao et al.
    2024; EAGLE-2): siblings share a position, and attention is restricted to each token's own
    branch, so every token's logits are exactly those of its branch read as a sequence."""

    def __init__(self, parents: list[int]):
        k = len(parents)
        depth = [0] * k
        seen = torch.eye(k, dtype=torch.bool)  # [i, j]: j is i or an ancestor of i
        for i, p in enumerate(parents):
            if not -1 <= p < i:
                raise ValueError(f"tree parent {p} of token {i} must come before it")
            if p >= 0:
                depth[i] = depth[p] + 1
                seen[i] |= seen[p]
        self.parents = list(parents)
        self.depth = torch.tensor(depth, dtype=torch.long)  # [k]
        self.ancestry = seen  # [k, k]

    def mask(self, start: int) -> torch.Tensor:
        """``[k, start + k]``: what each token may attend to - the cached context and its branch."""
        k = len(self.parents)
        return torch.cat([torch.ones(k, start, dtype=torch.bool), self.ancestry], dim=1)

    def padded(self, pad: int) -> "TreeLayout":
        """The same tree with ``pad`` ignored tokens after it, each a root of its own."""
        return TreeLayout(self.parents + [-1] * pad)
