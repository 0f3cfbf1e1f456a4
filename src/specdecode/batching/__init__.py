"""Serving many requests at once: continuous batching with speculation under a verification
budget (``engine``: the step; ``budget``: how many drafted tokens each request sends)."""

from .budget import PassCost, allocate
from .engine import BatchEngine, BatchEvent, Sequence

__all__ = ["BatchEngine", "BatchEvent", "PassCost", "Sequence", "allocate"]
