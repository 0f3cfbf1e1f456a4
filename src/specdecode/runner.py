"""One model and its KV cache.

The runner remembers which token ids its cache holds. Feeding tokens appends to the cache; cutting
back (after a rejection) is ``truncate`` - no recomputation from the start. ``sync`` reuses the
longest common prefix between the cache and a new context, so a drafter or a second request that
shares a prompt prefix pays only for the new suffix.
"""

from __future__ import annotations

import weakref

import torch


def common_prefix(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class ModelRunner:
    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = vocab_size  # logits are cut to this many columns (padded vocabularies)
        self.cached: list[int] = []  # token ids whose keys/values are in the cache, in order
        self._cache = None

    def reset(self) -> None:
        self.cached = []
        self._cache = None

    def truncate(self, length: int) -> None:
        """Cut the cache back to its first ``length`` tokens."""
        if length < len(self.cached):
            if length == 0:
                self.reset()
                return
            self._cache.crop(length - len(self.cached))  # negative: number of tokens to remove
            del self.cached[length:]

    def sync(self, context: list[int]) -> int:
        """Keep the longest cached prefix of ``context``; return how many tokens of it are cached."""
        n = common_prefix(self.cached, context)
        self.truncate(n)
        return n

    @torch.inference_mode()
    def forward(self, token_ids: list[int], num_logits: int = 1) -> torch.Tensor:
        """Append ``token_ids`` to the cache in one pass; return logits ``[num_logits, vocab]``
        for the last ``num_logits`` of them (0 computes no logits: a prefill)."""
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=max(num_logits, 1)
        )
        self.cached.extend(token_ids)
        logits = out.logits[0, -num_logits:] if num_logits else out.logits[0, :0]
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        return logits.float().cpu()

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, ``[batch, kv_heads, len, head_dim]``, for tests and checks."""
        if self._cache is None:
            return []
        return [(layer.keys, layer.values) for layer in self._cache.layers]


# one lean copy per model, so that a drafter and a decoder over it share the weights; kept apart from
# the model (not as an attribute) so that a deep copy of the model does not carry the original's
_LEAN: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def lean_model(model: torch.nn.Module):
    """The model's ``fastllama.FastLlama``, built on first use (tuned for this machine)."""
    from . import fastllama

    built = _LEAN.get(model)
    if built is None:
        from .models import cache_dir

        built = fastllama.FastLlama(model, tuning_cache=cache_dir() / "layout-tuning.json")
        _LEAN[model] = built
    return built


def runs_lean(model: torch.nn.Module, fast: bool = True) -> bool:
    """Whether ``make_runner`` gives this model the lean Llama forward (see ``fastllama``)."""
    from . import fastllama

    return fast and fastllama.supports(model)


def make_runner(model: torch.nn.Module, vocab_size: int | None = None, fast: bool = True):
    """The fastest runner that computes this model exactly: the lean Llama forward where it
    supports the architecture, else the Hugging Face module itself."""
    if runs_lean(model, fast):
        from . import fastllama

        return fastllama.FastRunner(lean_model(model), vocab_size=vocab_size)
    return ModelRunner(model, vocab_size=vocab_size)
