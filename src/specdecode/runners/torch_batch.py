"""Several sequences of a torch target scored together in one pass: what continuous batching runs
on with the torch backend (``batching.BatchEngine``), beside ``llamacpp_batch`` for GGUF targets.

Each slot is a ``LeanRunner`` of its own (its KV cache, its cached ids, its captured features, so
a draft head reads a slot as it reads a single runner). A pass concatenates every slot's block:
the products run over all the blocks' tokens at once (the weights are read once a pass, which is
what batching buys on a CPU), the attention over each slot's own cache, causal for a chain and
restricted to each node's branch for a tree (``TreeLayout``), so a slot's logits are those of its
block run alone up to the float rounding of a product over more rows.
"""

from __future__ import annotations

import torch

from .base import BatchRunner, Block, TreeBatchRunner, one_batch
from .lean import LeanRunner
from .llama import LeanLlama
from .tree import TreeLayout


class TorchBatchRunner(BatchRunner, TreeBatchRunner):
    """``slots`` sequences of up to ``slot_context`` tokens each over one ``LeanLlama``."""

    def __init__(self, model: LeanLlama, slots: int, slot_context: int, vocab_size: int | None = None):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.model = model
        self.slots = slots
        self.capacity = min(slot_context, model.max_positions)  # tokens a slot may hold
        self.seqs = [LeanRunner(model, vocab_size, capacity=min(256, self.capacity)) for _ in range(slots)]

    @property
    def cached(self) -> list[list[int]]:
        return [seq.cached for seq in self.seqs]

    def slot_runner(self, slot: int) -> LeanRunner:
        """The slot as a single runner: what a drafter that reads the target's features attaches to."""
        return self.seqs[slot]

    def capture_layers(self, layers: tuple[int, ...] | None) -> None:
        for seq in self.seqs:
            seq.capture_layers(layers)

    def clear(self, slot: int) -> None:
        self.seqs[slot].reset()

    def truncate(self, slot: int, length: int) -> None:
        self.seqs[slot].truncate(length)

    def keep_branch(self, slot: int, start: int, nodes: list[int]) -> None:
        self.seqs[slot].keep_branch(start, nodes)

    def pass_shape(self, blocks: dict[int, int]) -> tuple[int, int]:
        """One micro-batch: every block of a pass runs in the same products."""
        return one_batch(blocks)

    def forward(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        """One pass over every block (one per slot); slot -> ``[num_logits, vocab]`` logits for its
        block's last tokens (a tree block: ``num_logits`` = all its nodes)."""
        blocks = sorted(blocks, key=lambda block: block.slot)
        segments = []
        for block in blocks:
            seq = self.seqs[block.slot]
            if len(seq.cached) + len(block.tokens) > self.capacity:
                raise ValueError(f"slot {block.slot}: {len(seq.cached) + len(block.tokens)} tokens exceed "
                                 f"its {self.capacity}")
            tree = None if block.parents is None else TreeLayout(block.parents)
            segments.append(seq.segment(block.tokens, block.num_logits, tree))
        capture = self.seqs[0].feature_layers
        logits, hidden = self.model.forward_segments(segments, capture)
        out, at = {}, 0
        for block, rows in zip(blocks, logits):
            k = len(block.tokens)
            out[block.slot] = self.seqs[block.slot].commit(block.tokens, rows, hidden[at:at + k])
            at += k
        return out
