"""The decoding loop, for one request or many: continuous batching with speculation
(``engine``: the step; ``plan``: what each request sends, by its policy when alone, else by the
verification budget; ``budget``: the budget's pass prices and allocation)."""

from .budget import PassCost, allocate
from .engine import BatchEngine
from .plan import Sequence

__all__ = ["BatchEngine", "PassCost", "Sequence", "allocate"]
