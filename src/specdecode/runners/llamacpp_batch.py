"""Several sequences in one llama.cpp context, scored together in one pass: what continuous
batching runs on (``batching.BatchEngine``).

Each sequence has a slot (llama.cpp's sequence id) with a KV stream of its own, and a pass holds
one block of tokens per slot, any lengths. llama.cpp cuts the pass into micro-batches that take an
equal number of tokens from each of a run of consecutive slots (``micro_batches`` simulates it).
Every micro-batch stays on the attention path whose rows do not depend on the rest of the pass
(``runners.llamacpp``): at most ``UBATCH`` tokens, and never a single token of a single slot, which
takes a path of its own once the cache view is long; such a block gets a copy of its last token,
removed at once. A sequence's logits are then bit-identical to the single runner's whatever else
shares its pass (tests/test_batching.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .llamacpp import MAX_BLOCK, UBATCH, LlamaCppContext, LlamaCppModel


@dataclass(frozen=True)
class Block:
    slot: int
    tokens: list[int]  # appended at the slot's next positions
    num_logits: int  # logits are wanted for the last num_logits tokens


def micro_batches(lengths: dict[int, int], ubatch: int = UBATCH) -> list[dict[int, int]]:
    """How llama.cpp cuts a pass with ``lengths[slot]`` tokens per slot into micro-batches
    (``llama_batch_allocr::split_equal``, sequential streams): a run of consecutive slots, the
    shortest remaining block of the run (at most ``ubatch`` tokens in all) from each of them."""
    remaining = {slot: n for slot, n in sorted(lengths.items()) if n > 0}
    out = []
    while remaining:
        run, last = [], None
        for slot in remaining:  # ascending
            if last is None or slot == last + 1:
                run.append(slot)
                last = slot
        run = run[:ubatch]
        piece = max(1, min(min(remaining[slot] for slot in run), ubatch // len(run)))
        out.append({slot: piece for slot in run})
        for slot in run:
            remaining[slot] -= piece
            if not remaining[slot]:
                del remaining[slot]
    return out


def padded_lengths(lengths: dict[int, int]) -> dict[int, int]:
    """Block lengths with a copy added where a micro-batch would hold one token of one slot."""
    lengths = dict(lengths)
    while True:
        lone = [slot for mb in micro_batches(lengths) if len(mb) == 1 for slot, n in mb.items() if n == 1]
        if not lone:
            return lengths
        lengths[lone[0]] += 1


class LlamaCppBatchRunner(LlamaCppContext):
    """``slots`` sequences of up to ``slot_context`` tokens each, and the token ids each holds."""

    def __init__(self, model: LlamaCppModel, slots: int, slot_context: int, vocab_size: int | None = None):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        super().__init__(model, slot_context + 1, slots, vocab_size)  # + room for a padding copy
        self.slots = slots
        self.capacity = slot_context  # tokens a slot may hold
        self.cached: list[list[int]] = [[] for _ in range(slots)]

    def clear(self, slot: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, slot, -1, -1)
        self.cached[slot] = []

    def truncate(self, slot: int, length: int) -> None:
        if length < len(self.cached[slot]):
            self.lib.llama_memory_seq_rm(self.memory, slot, length, -1)
            del self.cached[slot][length:]

    def forward(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        """One pass over every block (one per slot); slot -> ``[num_logits, vocab]`` logits for its
        block's last tokens."""
        blocks = sorted(blocks, key=lambda block: block.slot)
        padded = padded_lengths({block.slot: len(block.tokens) for block in blocks})
        if sum(padded.values()) > MAX_BLOCK:
            raise ValueError(f"a pass over more than {MAX_BLOCK} tokens")
        b, n, wanted = self.batch, 0, []
        for block in blocks:
            start = len(self.cached[block.slot])
            if start + len(block.tokens) > self.capacity:
                raise ValueError(f"slot {block.slot}: {start + len(block.tokens)} tokens exceed its {self.capacity}")
            first = len(block.tokens) - block.num_logits
            for i in range(padded[block.slot]):
                b.token[n] = block.tokens[min(i, len(block.tokens) - 1)]  # past the block: a copy of its last
                b.pos[n] = start + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = block.slot
                b.logits[n] = first <= i < len(block.tokens)
                n += 1
            wanted.append(range(n - (padded[block.slot] - len(block.tokens)) - block.num_logits,
                                n - (padded[block.slot] - len(block.tokens))))
        b.n_tokens = n
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} ({n} tokens in {len(blocks)} slots)")
        out = {}
        for block, rows in zip(blocks, wanted):
            start = len(self.cached[block.slot])
            if padded[block.slot] > len(block.tokens):  # the copy's cache entry goes at once
                self.lib.llama_memory_seq_rm(self.memory, block.slot, start + len(block.tokens), -1)
            self.cached[block.slot].extend(block.tokens)
            out[block.slot] = self._logits(rows)  # [num_logits, vocab]
        return out
