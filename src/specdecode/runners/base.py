"""What the decoding loop and the drafters need from a model: the ``Runner`` protocol.

A runner owns one model's KV cache and remembers which token ids it holds (``cached``). Feeding
tokens appends to the cache; cutting back after a rejection is ``truncate``, with no recomputation;
``sync`` keeps the longest common prefix of the cache and a new context, so a drafter or a second
request that shares a prompt prefix pays only for the new suffix.

Optional capabilities are protocols of their own, which a runner declares by subclassing them
and a drafter or the engine asks for with ``isinstance``:

* ``TreeRunner``: score a token tree in one pass and keep one branch (tree verification);
* ``FeatureRunner``: keep the outputs of chosen decoder layers at every cached position (what a
  trained draft head reads);
* ``Batchable``: run the same model as a ``BatchRunner``, many sequences in one pass (continuous
  batching), whose tree blocks are the ``TreeBatchRunner`` capability.

A new backend is a new module beside ``hf.py`` and ``lean.py`` whose runner subclasses ``Runner``
(and the capabilities it has), and one more branch in ``runners.make_runner``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@dataclass(frozen=True)
class Block:
    """One slot's tokens in a pass of a batch runner (``llamacpp_batch``, ``torch_batch``)."""

    slot: int
    tokens: list[int]  # appended at the slot's next positions
    num_logits: int  # logits are wanted for the last num_logits tokens
    # None: a chain. A token tree (``torch_batch``; llama.cpp refuses one): ``parents[i]`` is the block index
    # of token i's parent, -1 for the slot's last cached token; logits then for every node
    parents: list[int] | None = None


def one_batch(blocks: dict[int, int]) -> tuple[int, int]:
    """The shape of a pass whose blocks are computed together, as ``batching.budget.PassCost``
    prices it: one micro-batch, which holds a single token when the pass does."""
    return 1, int(sum(blocks.values()) == 1)


@runtime_checkable
class Runner(Protocol):
    """One model and its KV cache."""

    cached: list[int]  # token ids whose keys/values are in the cache, in order
    vocab_size: int | None  # logits are cut to this many columns (padded vocabularies)

    def forward(self, token_ids: list[int], num_logits: int = 1) -> torch.Tensor:
        """Append ``token_ids`` to the cache in one pass; return float32 CPU logits
        ``[num_logits, vocab]`` for the last ``num_logits`` of them (0: a prefill, no logits)."""
        ...

    def truncate(self, length: int) -> None:
        """Cut the cache back to its first ``length`` tokens."""
        ...

    def reset(self) -> None:
        """Empty the cache."""
        ...

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, ``[batch, kv_heads, len, head_dim]``, for tests and checks."""
        ...

    def sync(self, context: list[int]) -> int:
        """Keep the longest cached prefix of ``context``; return how many tokens of it are cached."""
        n = common_prefix(self.cached, context)
        self.truncate(n)
        return n


@runtime_checkable
class TreeRunner(Protocol):
    """A runner that verifies a token tree in one pass (SpecInfer, Miao et al. 2024)."""

    def forward_tree(self, token_ids: list[int], parents: list[int]) -> torch.Tensor:
        """Score a tree appended after the cache: ``parents[i]`` is the block index of token i's
        parent (-1: the last cached token). Logits ``[k, vocab]`` at every node; until
        ``keep_branch`` the cache holds the whole tree."""
        ...

    def keep_branch(self, start: int, nodes: list[int]) -> None:
        """After ``forward_tree`` at cache length ``start``: keep the nodes ``nodes`` (block
        indices of one branch, root first) as the sequence continuing the cache, drop the rest."""
        ...


@runtime_checkable
class BatchRunner(Protocol):
    """Several sequences (slots) of one model, each with its own KV cache, scored together in one
    pass: what continuous batching runs on (``batching.BatchEngine``). A slot's logits must not
    depend on what else shares its pass (each implementation says how far it holds that)."""

    slots: int  # sequences it holds
    capacity: int  # tokens one slot may hold
    cached: list[list[int]]  # per slot, the token ids its cache holds, in order

    def forward(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        """One pass over every block (at most one per slot); slot -> float32 CPU logits
        ``[num_logits, vocab]`` for its block's last tokens (a tree: every node)."""
        ...

    def truncate(self, slot: int, length: int) -> None:
        """Cut slot ``slot``'s cache back to its first ``length`` tokens."""
        ...

    def clear(self, slot: int) -> None:
        """Empty slot ``slot``'s cache."""
        ...

    def pass_shape(self, blocks: dict[int, int]) -> tuple[int, int]:
        """How many micro-batches a pass of these blocks (slot -> tokens) runs as, and how many of
        them hold one token (``batching.budget.PassCost`` prices those apart)."""
        ...

    def slot_runner(self, slot: int) -> Runner | None:
        """Slot ``slot`` as a ``Runner`` of its own, for a drafter that reads the target (features);
        None where a slot is not one."""
        ...


@runtime_checkable
class TreeBatchRunner(Protocol):
    """A batch runner whose blocks may be token trees (``Block.parents``)."""

    def keep_branch(self, slot: int, start: int, nodes: list[int]) -> None:
        """After a tree block at cache length ``start``: keep the nodes ``nodes`` (block indices of
        one branch, root first) as the slot's continuation, drop the rest."""
        ...


@runtime_checkable
class Batchable(Protocol):
    """A runner whose model can also run as a ``BatchRunner`` (the batch engine's target)."""

    def batch_runner(self, slots: int, slot_context: int) -> BatchRunner:
        """``slots`` sequences of up to ``slot_context`` tokens each over this runner's model, with
        its vocabulary cut and the features it captures."""
        ...


class OneSlot(BatchRunner, TreeBatchRunner):
    """Any ``Runner`` as a batch runner of one slot: the engine's one loop runs a lone request (and
    every backend that cannot batch) as a batch of one. Trees go to the runner's ``TreeRunner``
    passes; ``capacity`` 0 means no limit but the model's."""

    slots = 1

    def __init__(self, runner: Runner, capacity: int):
        self.runner, self.capacity = runner, capacity

    @property
    def cached(self) -> list[list[int]]:
        return [self.runner.cached]

    def forward(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        (block,) = blocks
        if block.parents is None:
            return {block.slot: self.runner.forward(block.tokens, num_logits=block.num_logits)}
        if not isinstance(self.runner, TreeRunner):
            raise RuntimeError(f"{type(self.runner).__name__} cannot score a token tree")
        return {block.slot: self.runner.forward_tree(block.tokens, block.parents)}

    def truncate(self, slot: int, length: int) -> None:
        self.runner.truncate(length)

    def clear(self, slot: int) -> None:
        self.runner.reset()

    def pass_shape(self, blocks: dict[int, int]) -> tuple[int, int]:
        return one_batch(blocks)

    def slot_runner(self, slot: int) -> Runner:
        return self.runner

    def keep_branch(self, slot: int, start: int, nodes: list[int]) -> None:
        self.runner.keep_branch(start, nodes)


@runtime_checkable
class FeatureRunner(Protocol):
    """A runner that keeps decoder-layer outputs at every cached position (EAGLE's features)."""

    def capture_layers(self, layers: tuple[int, ...] | None) -> None:
        """Keep the outputs of these decoder layers (ascending, ending with the last one; None:
        the last one only) from now on."""
        ...

    def features(self, start: int, end: int) -> torch.Tensor | None:
        """``[end - start, len(layers) * hidden]`` at positions ``start..end-1``, or None unless
        all of them are cached."""
        ...
