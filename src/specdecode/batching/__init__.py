"""Serving many requests at once: continuous batching with speculation under a verification
budget (``engine``: the step; ``budget``: how many drafted tokens each request sends)."""

from .budget import PassCost, allocate
from .engine import BatchEngine, Sequence

__all__ = ["BatchEngine", "PassCost", "Sequence", "allocate"]
