"""The llama.cpp backend: a GGUF file run in its own quantization by llama.cpp (through
llama-cpp-python's low-level API), behind the ``Runner`` protocol.

One context, one sequence: ``forward`` appends a batch of tokens at the next positions and asks for
logits at the last ``num_logits`` of them; ``truncate`` removes positions from the KV cache.

Kernels. A position's logits must not depend on how its pass was cut, or speculation (which
scores blocks) would leave plain decoding (1-token passes) at near-ties; on the default target's
Q4_1 file the paths differ by up to about 1 in the logits (docs/backends.md). The matrix products
give every row the same result in a pass of any length; attention does with flash attention, where
each query row walks its sequence's cells on its own ("one chunk"), except on llama.cpp's two other
attention paths, which both need f16 or f32 keys: a tiled path for 64 or more query rows of one
sequence, and a path that splits the cache between threads for a lone token once the cache view
reaches 512 cells. Keys are therefore cached as Q8_0 (``KEY_TYPE``; values stay f16), which keeps
every pass of every shape on the one-chunk path: no pass needs padding and prompts are read in
micro-batches of any size. (llama-cpp-python's ``Llama``, as its users run it, caches f16 keys
and values without flash attention; ``peers`` turns flash attention on, its faster path here.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import MAX_BLOCK, ConfigError
from .base import Batchable, Runner

FALLBACK_CONTEXT = 4096  # KV cache cells per context for a file that does not say its trained context
KEY_TYPE = "GGML_TYPE_Q8_0"  # the cached keys' type: one attention path for every pass (module docstring)


def default_threads() -> int:
    """The machine's cores (llama.cpp is compute-bound on a small CPU)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_threads(threads) -> None:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError("threads", f"must be an integer >= 1 (got {threads!r})")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError("backend", "the llamacpp backend needs llama-cpp-python: pip install llama-cpp-python "
                                     f"({exc})") from None
    return llama_cpp


_BACKEND_READY = threading.Lock()
_backend_started = False


def _start_backend(lib) -> None:
    global _backend_started, _QUIET_LOG
    with _BACKEND_READY:
        if not _backend_started:
            _QUIET_LOG = lib.llama_log_callback(_quiet_log)
            lib.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))  # llama.cpp logs every load to stderr otherwise
            lib.llama_backend_init()
            _backend_started = True


def extra_buffers(lib) -> bool:
    """Whether llama.cpp may put weights in its extra CPU buffer types (repacked layouts). Not
    where it was built with AMX: its AMX buffers crash in the first pass on this llama.cpp
    (ggml-org/llama.cpp#20824; a segfault in every pass of the default Q4_1 file on a Sapphire
    Rapids host) and have given wrong results for Q4_0 and Q4_1 (#16315). The plain CPU kernels
    are the ones llama.cpp uses on every other x86 host for this file."""
    return b"AMX_INT8 = 1" not in lib.llama_print_system_info()


@contextlib.contextmanager
def high_level_defaults():
    """While llama-cpp-python's ``Llama`` loads a model: its default model parameters with
    ``extra_buffers`` applied (``Llama`` takes no option for it; it reads the defaults from the
    bindings module at load)."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_buffers(lib)
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def _quiet_log(level, text, user_data):  # errors still reach the caller as return codes
    pass


_QUIET_LOG = None  # the ctypes callback, kept alive for as long as llama.cpp may call it


@dataclass(frozen=True)
class LlamaCppConfig:
    """What the engine and the drafters read of a model's configuration (as of a Hugging Face
    config): the same attribute names, so the code that reads them needs no second path."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    eos_token_id: int | None


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp (weights memory-mapped, in their own quantization).

    The contexts and runners below call the library through ``lib`` for what llama.cpp and its
    fork ik_llama.cpp share (batches, decode, logits) and through this object for what differs
    (contexts, KV removal): ``runners.ik.IkModel`` is the fork's.
    """

    backend = "llamacpp"  # the --backend name that loads it
    max_block = MAX_BLOCK  # tokens per llama_decode call; longer inputs (prefills) are cut

    def __init__(self, path: str | Path, threads: int | None = None, context: int | None = None):
        check_threads(threads)
        lib = _llama_cpp()
        _start_backend(lib)
        self.lib, self.path = lib, Path(path)
        self.threads = threads or default_threads()
        self.key_type = KEY_TYPE  # of the contexts created from now on
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = extra_buffers(lib)
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise ConfigError("target", f"llama.cpp could not load {self.path}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.config = self._describe(context, trained=lib.llama_model_n_ctx_train(self.model),
                                     layers=lib.llama_model_n_layer(self.model))

    def _describe(self, context: int | None, trained: int, layers: int) -> LlamaCppConfig:
        """The loaded file's ``LlamaCppConfig`` (``context``: KV cells per sequence, None: as trained)."""
        lib = self.lib
        eos = lib.llama_vocab_eos(self.vocab)
        return LlamaCppConfig(
            model_type=self._meta("general.architecture") or "llama", vocab_size=lib.llama_vocab_n_tokens(self.vocab),
            hidden_size=lib.llama_model_n_embd(self.model), num_hidden_layers=layers,
            max_position_embeddings=context or (trained if trained > 0 else FALLBACK_CONTEXT),
            eos_token_id=eos if eos >= 0 else None,
        )

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def new_context(self, capacity: int | None = None, streams: int = 1):
        """A llama.cpp context over these weights: ``capacity`` KV cells for each of ``streams``
        sequences (``LlamaCppBatchRunner``)."""
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = (capacity or self.config.max_position_embeddings) * streams
        params.n_batch = params.n_ubatch = MAX_BLOCK
        params.type_k = getattr(lib, self.key_type)
        params.n_seq_max = streams
        # a KV stream per sequence: its cells stay in the order of its positions (a shared pool
        # reuses freed cells anywhere, and attention sums in cell order)
        params.kv_unified = streams == 1
        params.n_threads = params.n_threads_batch = self.threads
        # every query row on its own: identical logits for any pass shape (module docstring)
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise ConfigError("target", f"llama.cpp could not create a context of {params.n_ctx} tokens "
                                        f"in {streams} streams")
        return ctx

    def batch_runner(self, slots: int, slot_context: int, vocab_size: int | None = None):
        """Several sequences in one context (``runners.llamacpp_batch``), for the batch engine."""
        from .llamacpp_batch import LlamaCppBatchRunner

        return LlamaCppBatchRunner(self, slots, slot_context, vocab_size)

    def kv_remove(self, ctx, seq: int, start: int, end: int = -1) -> None:
        """Drop sequence ``seq``'s cached positions ``start..end-1`` (-1: from 0 / to the end)."""
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(ctx), seq, start, end)

    def kv_clear(self, ctx) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(ctx), True)

    def _free_weights(self) -> None:
        self.lib.llama_model_free(self.model)

    def __del__(self):
        if getattr(self, "model", None):
            self._free_weights()
            self.model = None


class LlamaCppContext:
    """A llama.cpp context of ``cells`` KV cells per sequence for up to ``streams`` sequences, its
    reusable batch, and the logits it leaves; freed with the object."""

    def __init__(self, model: LlamaCppModel, cells: int, streams: int = 1, vocab_size: int | None = None):
        self.model, self.lib = model, model.lib
        self.vocab_size = vocab_size
        self.n_vocab = model.config.vocab_size
        self.ctx = model.new_context(cells, streams=streams)
        self.batch = self.lib.llama_batch_init(MAX_BLOCK, 0, 1)

    def _logits(self, count: int) -> torch.Tensor:
        """``[count, vocab]``: the logits of the ``count`` positions the last decode was asked for,
        in batch order (llama.cpp keeps them contiguous), cut to ``vocab_size`` columns: a copy of
        llama.cpp's output buffer, which the next decode overwrites."""
        columns = self.n_vocab if self.vocab_size is None else self.vocab_size
        if count == 0:
            return torch.zeros(0, columns)
        rows = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(count, self.n_vocab))
        return torch.from_numpy(rows[:, :columns].copy())

    def __del__(self):
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None


class LlamaCppRunner(LlamaCppContext, Runner, Batchable):
    """One llama.cpp context and the token ids its KV cache holds."""

    def __init__(self, model: LlamaCppModel, vocab_size: int | None = None, capacity: int | None = None):
        self.capacity = capacity or model.config.max_position_embeddings
        super().__init__(model, self.capacity, vocab_size=vocab_size)
        self.cached: list[int] = []

    def batch_runner(self, slots: int, slot_context: int):
        """Slots over this runner's model, as its backend batches them (``LlamaCppModel.batch_runner``)."""
        return self.model.batch_runner(slots, slot_context, self.vocab_size)

    def reset(self) -> None:
        self.model.kv_clear(self.ctx)
        self.cached = []

    def truncate(self, length: int) -> None:
        if length < len(self.cached):
            self.model.kv_remove(self.ctx, 0, length)
            del self.cached[length:]

    def _decode(self, token_ids: list[int], start: int, logits_from: int) -> None:
        """One llama_decode call: ``token_ids`` at positions ``start...``, logits for indices
        ``logits_from`` and after."""
        b = self.batch
        for i, tok in enumerate(token_ids):
            b.token[i] = tok
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i >= logits_from
        b.n_tokens = len(token_ids)
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise RuntimeError(f"llama_decode failed with code {code} at position {start} ({len(token_ids)} tokens)")

    def forward(self, token_ids: list[int], num_logits: int = 1) -> torch.Tensor:
        start, k = len(self.cached), len(token_ids)
        if start + k > self.capacity:
            raise ValueError(f"context of {start + k} tokens exceeds this context's {self.capacity}")
        rows: list[torch.Tensor] = []
        step = self.model.max_block
        for at in range(0, k, step):  # long prefills in several calls; logits only from the last ones
            block = token_ids[at:at + step]
            first_wanted = min(len(block), max(0, (k - num_logits) - at)) if num_logits else len(block)
            self._decode(block, start + at, first_wanted)
            rows.append(self._logits(len(block) - first_wanted))
        self.cached.extend(token_ids)
        if len(rows) == 1:  # a pass of one call: its logits are a copy already
            return rows[0]  # [num_logits, vocab]
        return torch.cat(rows) if rows else self._logits(0)  # [num_logits, vocab]

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """llama.cpp does not expose its KV cache; tests compare logits after a rollback instead."""
        return []
