"""The ik_llama.cpp backend: a GGUF file run in its own quantization by ik_llama.cpp, the llama.cpp
fork with batched CPU kernels for the legacy quantizations (Q4_0, Q4_1, ...), through our
declaration of its C API (``ik_api``).

``IkModel`` is a ``LlamaCppModel`` whose contexts and KV operations are the fork's, so the
llama.cpp runner (``LlamaCppRunner``) drives it unchanged: batches, decode and logits are the
same C calls in both libraries. Several sequences share one context with a KV stream each on our
build (``IkStreamBatchRunner``, patch 0005), a context each on the prebuilt wheel (``IkBatchRunner``).

Kernels. A position's logits must not depend on how its pass was cut (``runners.llamacpp``).
ik picks another kernel for a product of 32 or more rows (it repacks the weights on the fly), with
other roundings. Our build (ik/build.py, patch 0004) lets ``ik_api.load`` turn that switch off
(``NEVER_REPACK``): every pass length then scores each token bit for bit alike, and the start-up
check (``ik_api.probe``) finds every call length up to ``MAX_BLOCK`` exact. With the prebuilt wheel
the switch stays, and every call is cut to the longest length the check found exact (31), so
prompts are read in 31-token calls. Keys and values are cached as f16. Flash attention is off
(``FLASH_ATTENTION``): the fork asserts on longer prompts with it on some CPUs and aborted with
several sequences on one with AVX512-VNNI.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import MAX_BLOCK, ConfigError
from .base import BatchRunner, Block
from .ik_api import IkUnavailable, load, probe
from .llamacpp import LlamaCppModel, LlamaCppRunner, check_threads, default_threads
from .llamacpp_batch import LlamaCppBatchRunner

FLASH_ATTENTION = False  # off: see the module docstring
KV_PAD = 32  # ik pads a context's cells, and the cells attention reads, to this without flash attention


class IkModel(LlamaCppModel):
    """A GGUF file loaded by ik_llama.cpp (weights memory-mapped, in their own quantization)."""

    backend = "ik"

    def __init__(self, path: str | Path, threads: int | None = None, context: int | None = None,
                 max_block: int | None = None):
        """``max_block``: the longest llama_decode call (None: what ``ik_api.probe`` found exact
        on this machine for this file; the probe runs once per library, file and CPU)."""
        check_threads(threads)
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError("target", f"GGUF file not found: {self.path}")
        if max_block is None:
            checked = probe(self.path)
            if not checked.ok:
                raise ConfigError("backend", f"ik_llama.cpp cannot run {self.path.name} here: {checked.reason}")
            max_block = checked.exact_block
        self.max_block = max_block
        try:
            lib = load()
        except IkUnavailable as exc:
            raise ConfigError("backend", str(exc)) from None
        self.lib = lib
        self.threads = threads or default_threads()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise ConfigError("target", f"ik_llama.cpp could not load {self.path} (not a GGUF file it reads)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.config = self._describe(context, trained=lib.llama_n_ctx_train(self.model),
                                     layers=lib.llama_n_layer(self.model))

    def new_context(self, capacity: int | None = None, streams: int = 1):
        """An ik_llama.cpp context over these weights: ``capacity`` KV cells for each of
        ``streams`` sequences, in one pool (the fork has no stream per sequence)."""
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = (capacity or self.config.max_position_embeddings) * streams
        params.n_batch = params.n_ubatch = MAX_BLOCK
        params.n_seq_max = streams
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn = FLASH_ATTENTION
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise ConfigError("target", f"ik_llama.cpp could not create a context of {params.n_ctx} tokens "
                                        f"for {streams} sequences")
        return ctx

    def batch_runner(self, slots: int, slot_context: int,
                     vocab_size: int | None = None) -> "IkStreamBatchRunner | IkBatchRunner":
        """One context with a KV stream per slot where the build has them (patch 0005) and every
        call length up to ``MAX_BLOCK`` is exact; else a context per slot."""
        if self.lib.llama_kv_cache_seq_streams is not None and self.max_block >= MAX_BLOCK:
            return IkStreamBatchRunner(self, slots, slot_context, vocab_size)
        return IkBatchRunner(self, slots, slot_context, vocab_size)

    def kv_remove(self, ctx, seq: int, start: int, end: int = -1) -> None:
        if not self.lib.llama_kv_cache_seq_rm(ctx, seq, start, end):
            raise RuntimeError(f"ik_llama.cpp could not remove positions {start}..{end} of sequence {seq}")

    def kv_clear(self, ctx) -> None:
        self.lib.llama_kv_cache_clear(ctx)

    def _free_weights(self) -> None:
        self.lib.llama_free_model(self.model)


class IkStreamBatchRunner(LlamaCppBatchRunner):
    """``slots`` sequences of up to ``slot_context`` tokens each in one ik context with a KV stream
    per slot (our build's patch 0005, ``llama_kv_cache_seq_streams``): a pass is one llama_decode
    call over every slot's block, the weight products run once over all its tokens, and each
    slot's attention reads only its own cells, laid out as in a context of its own, so a slot's
    logits are bit-identical to a lone runner's whatever shares its pass (tests/test_ik_build.py).
    ik cuts a call into micro-batches of consecutive tokens, not per slot as llama.cpp does, and
    the engine's passes fit in one (``MAX_BLOCK``)."""

    def __init__(self, model: IkModel, slots: int, slot_context: int, vocab_size: int | None = None):
        # a stream is n_ctx / slots cells and ik pads n_ctx to a multiple of KV_PAD: a stream of
        # whole pads has the size a lone context of slot_context gets, so the cells attention reads
        # (padded to KV_PAD, at most the stream) match it at every length
        super().__init__(model, slots, -(-slot_context // KV_PAD) * KV_PAD, vocab_size)
        self.capacity = slot_context
        if not self.lib.llama_kv_cache_seq_streams(self.ctx, True):
            raise ConfigError("target", f"ik_llama.cpp cannot give {model.path.name} a KV stream per sequence")

    def pass_shape(self, blocks: dict[int, int]) -> tuple[int, int]:
        """The pass is one call and one ik micro-batch, but each slot in it adds attention ops of
        its own: in process (16 slots x 1 token against 1 slot x 16 tokens, 60 against 38 ms on 2
        cores) about 1.5 ms a slot, of the order of a pass's fixed part. So each slot with tokens
        counts as a micro-batch (``PassCost`` prices its fixed part per slot), and the pass's
        weight products run matrix-vector kernels only when it holds one token in all."""
        total = sum(blocks.values())
        return sum(1 for n in blocks.values() if n), int(total == 1)


class IkBatchRunner(BatchRunner):
    """``slots`` sequences of up to ``slot_context`` tokens each, a context of its own per slot,
    behind the batch runner methods of ``LlamaCppBatchRunner``; a pass is one llama_decode call
    per slot with tokens in it. Where the library has no KV stream per sequence (the wheel).

    Not one context for all slots without streams: the fork keeps several sequences' cells in one
    pool, and there its attention gives a sequence other logits than alone (by up to ~20 in a
    logit) for blocks of many shapes, depending on where the other sequences' cells lie, with flash
    attention off; with it on, it aborts on an assertion (a row whose chunk of cells is all masked).
    Measured in tests/test_ik.py, which keeps a shared context as a negative control."""

    def __init__(self, model: IkModel, slots: int, slot_context: int, vocab_size: int | None = None):
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots, self.capacity = slots, slot_context
        self.runners = [LlamaCppRunner(model, vocab_size, capacity=slot_context) for _ in range(slots)]

    @property
    def cached(self) -> list[list[int]]:
        return [runner.cached for runner in self.runners]

    def clear(self, slot: int) -> None:
        self.runners[slot].reset()

    def truncate(self, slot: int, length: int) -> None:
        self.runners[slot].truncate(length)

    def slot_runner(self, slot: int) -> LlamaCppRunner:
        return self.runners[slot]

    def pass_shape(self, blocks: dict[int, int]) -> tuple[int, int]:
        """One micro-batch per slot with tokens (its own call), and how many of them hold one token."""
        sizes = [n for n in blocks.values() if n]
        return len(sizes), sizes.count(1)

    def forward(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        """slot -> ``[num_logits, vocab]`` logits for its block's last tokens."""
        if any(block.parents is not None for block in blocks):
            raise ValueError("ik_llama.cpp batches score chains, not token trees")
        # [num_logits, vocab] each; a slot's runner refuses a block past its capacity
        return {block.slot: self.runners[block.slot].forward(block.tokens, block.num_logits)
                for block in sorted(blocks, key=lambda block: block.slot)}
