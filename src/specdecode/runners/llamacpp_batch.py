"""Several sequences in one llama.cpp context, scored together in one pass: what continuous
batching runs on (``batching.BatchEngine``).

Each sequence has a slot (llama.cpp's sequence id) with a KV stream of its own, and a pass holds
one block of tokens per slot, any lengths. llama.cpp cuts the pass into micro-batches that take an
equal number of tokens from each of a run of consecutive slots (``micro_batches``, which the
verification budget prices: each micro-batch costs a pass's fixed part); whatever their shapes,
attention stays on the path whose rows do not depend on the rest of the pass (``runners.llamacpp``),
so a sequence's logits are bit-identical to the single runner's whatever else shares its pass
(tests/test_batching.py).
"""

from __future__ import annotations

import torch

from .base import BatchRunner, Block
from .llamacpp import MAX_BLOCK, LlamaCppContext, LlamaCppModel


def micro_batches(blocks: dict[int, int], n_ubatch: int = MAX_BLOCK) -> list[int]:
    """Token counts of the micro-batches llama.cpp cuts a pass into, given slot -> tokens in the
    pass (its ``split_equal`` over sequences in KV streams of their own, blocks in slot order): a
    micro-batch starts at the lowest slot with tokens left, takes the run of consecutive slots after
    it that have tokens left, and takes as many tokens from each as the one with fewest has left
    (at most ``n_ubatch`` in all)."""
    left = {slot: n for slot, n in blocks.items() if n > 0}
    out = []
    while left:
        run = [min(left)]
        while run[-1] + 1 in left:
            run.append(run[-1] + 1)
        take = min(min(left[s] for s in run), max(1, n_ubatch // len(run)))
        out.append(take * len(run))
        for s in run:
            left[s] -= take
            if not left[s]:
                del left[s]
    return out


def pass_shape(blocks: dict[int, int]) -> tuple[int, int]:
    """How many micro-batches a pass of these blocks runs as, and how many of them hold one token
    (``batching.budget.PassCost`` prices those apart)."""
    sizes = micro_batches(blocks)
    return len(sizes), sizes.count(1)


class LlamaCppBatchRunner(LlamaCppContext, BatchRunner):
    """``slots`` sequences of up to ``slot_context`` tokens each, and the token ids each holds."""

    def __init__(self, model: LlamaCppModel, slots: int, slot_context: int, vocab_size: int | None = None):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        super().__init__(model, slot_context, slots, vocab_size)
        self.slots = slots
        self.capacity = slot_context  # tokens a slot may hold
        self.cached: list[list[int]] = [[] for _ in range(slots)]

    def clear(self, slot: int) -> None:
        self.model.kv_remove(self.ctx, slot, -1)
        self.cached[slot] = []

    def truncate(self, slot: int, length: int) -> None:
        if length < len(self.cached[slot]):
            self.model.kv_remove(self.ctx, slot, length)
            del self.cached[slot][length:]

    def pass_shape(self, blocks: dict[int, int]) -> tuple[int, int]:
        return pass_shape(blocks)

    def slot_runner(self, slot: int) -> None:
        """None: a slot is not a runner of its own, for a drafter to read (no features here)."""
        return None

    def forward(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        """One pass over every block (one per slot); slot -> ``[num_logits, vocab]`` logits for its
        block's last tokens."""
        blocks = sorted(blocks, key=lambda block: block.slot)
        if any(block.parents is not None for block in blocks):
            raise ValueError("llama.cpp batches score chains, not token trees")
        if sum(len(block.tokens) for block in blocks) > MAX_BLOCK:
            raise ValueError(f"a pass over more than {MAX_BLOCK} tokens")
        b, n = self.batch, 0
        for block in blocks:
            start = len(self.cached[block.slot])
            if start + len(block.tokens) > self.capacity:
                raise ValueError(f"slot {block.slot}: {start + len(block.tokens)} tokens exceed its {self.capacity}")
            first = len(block.tokens) - block.num_logits
            for i, token in enumerate(block.tokens):
                b.token[n] = token
                b.pos[n] = start + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = block.slot
                b.logits[n] = i >= first
                n += 1
        b.n_tokens = n
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} ({n} tokens in {len(blocks)} slots)")
        logits = self._logits(sum(block.num_logits for block in blocks))  # [outputs, vocab], in block order
        out, at = {}, 0
        for block in blocks:
            self.cached[block.slot].extend(block.tokens)
            out[block.slot] = logits[at:at + block.num_logits]  # [num_logits, vocab]
            at += block.num_logits
        return out
