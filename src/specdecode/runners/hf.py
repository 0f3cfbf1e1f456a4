"""The Hugging Face runner: any causal LM module, with transformers' ``DynamicCache``."""

from __future__ import annotations

import torch

from .base import Runner


class HFRunner(Runner):
    def __init__(self, model: torch.nn.Module, vocab_size: int | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = vocab_size
        self.cached: list[int] = []
        self._cache = None

    def reset(self) -> None:
        self.cached = []
        self._cache = None

    def truncate(self, length: int) -> None:
        if length < len(self.cached):
            if length == 0:
                self.reset()
                return
            self._cache.crop(length - len(self.cached))  # negative: number of tokens to remove
            del self.cached[length:]

    @torch.inference_mode()
    def forward(self, token_ids: list[int], num_logits: int = 1) -> torch.Tensor:
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, k]
        out = self.model(
            input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=max(num_logits, 1)
        )
        self.cached.extend(token_ids)
        logits = out.logits[0, -num_logits:] if num_logits else out.logits[0, :0]
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        return logits.float().cpu()

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._cache is None:
            return []
        return [(layer.keys, layer.values) for layer in self._cache.layers]
