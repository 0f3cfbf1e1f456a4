"""The lean runner: ``LeanLlama``'s forward over a preallocated KV cache, with tree passes and
feature capture (``TreeRunner``, ``FeatureRunner``)."""

from __future__ import annotations

import torch

from .base import Batchable, FeatureRunner, Runner, TreeRunner
from .llama import LeanLlama, Segment
from .tree import TreeLayout

INITIAL_CAPACITY = 256  # cache slots allocated up front; doubled (up to the model's positions) as needed


class LeanRunner(Runner, TreeRunner, FeatureRunner, Batchable):
    def __init__(self, model: LeanLlama, vocab_size: int | None = None, capacity: int = INITIAL_CAPACITY):
        self.model = model
        self.vocab_size = vocab_size
        self.cached: list[int] = []
        self._cache = model.new_cache(capacity)
        # the outputs of these decoder layers (the last one's before the final norm) at every cached
        # position, side by side: what draft heads read (``capture_layers``)
        self.feature_layers: tuple[int, ...] = (len(model.layers) - 1,)
        self._features = torch.empty(capacity, model.hidden, dtype=model.embed.dtype, device=model.device)

    def capture_layers(self, layers: tuple[int, ...] | None) -> None:
        """Changing the layers empties the cache, whose stored features have the old width."""
        n = len(self.model.layers)
        layers = (n - 1,) if layers is None else tuple(layers)
        if layers == self.feature_layers:
            return
        if not layers or list(layers) != sorted(set(layers)) or layers[-1] != n - 1 or layers[0] < 0:
            raise ValueError(f"feature layers must be ascending, distinct, and end with the last layer {n - 1}; "
                             f"got {layers}")
        self.feature_layers = layers
        self._features = self._features.new_empty(self._features.shape[0], len(layers) * self.model.hidden)
        self.reset()

    def batch_runner(self, slots: int, slot_context: int):
        """Slots of this runner's model that capture the same features (``torch_batch``)."""
        from .torch_batch import TorchBatchRunner

        runner = TorchBatchRunner(self.model, slots, slot_context, self.vocab_size)
        runner.capture_layers(self.feature_layers)
        return runner

    def reset(self) -> None:
        self.cached = []

    def truncate(self, length: int) -> None:
        del self.cached[length:]  # the buffer beyond this length is simply overwritten later

    def _ensure(self, length: int) -> None:
        capacity = self._cache[0].shape[3]
        if length <= capacity:
            return
        new_capacity = min(max(length, 2 * capacity), self.model.max_positions)
        if length > new_capacity:
            raise ValueError(f"context of {length} tokens exceeds the model's {self.model.max_positions}")
        grown = self.model.new_cache(new_capacity)
        n = len(self.cached)
        for old, new in zip(self._cache, grown):
            new[:, :, :, :n] = old[:, :, :, :n]
        self._cache = grown
        features = self._features.new_empty(new_capacity, self._features.shape[1])
        features[:n] = self._features[:n]
        self._features = features

    def forward(self, token_ids: list[int], num_logits: int = 1, tree: TreeLayout | None = None) -> torch.Tensor:
        # Padded to a block size the kernels run faster: the extra tokens come after the real ones
        # (as roots of their own, in a tree), so no real token attends to them; their keys sit
        # past the cache's length and their logits and features are dropped.
        pad = self.model.padding(len(token_ids), len(self.cached))
        segment = self.segment(token_ids, num_logits, tree, pad)
        logits, hidden = self.model.forward_segments([segment], self.feature_layers)
        return self.commit(token_ids, logits[0][:num_logits], hidden)

    def segment(self, token_ids: list[int], num_logits: int, tree: TreeLayout | None = None, pad: int = 0) -> Segment:
        """These tokens (and ``pad`` copies of the last) after the cache, as one segment of a pass."""
        ids = token_ids + token_ids[-1:] * pad
        if pad and tree is not None:
            tree = tree.padded(pad)
        start = len(self.cached)
        self._ensure(start + len(ids))
        return Segment(torch.tensor(ids, dtype=torch.long, device=self.model.device), start, self._cache,
                       num_logits + pad if num_logits else 0, tree)

    def commit(self, token_ids: list[int], logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """After the pass over ``segment(token_ids, ...)``: keep their features (the first
        ``len(token_ids)`` rows of ``hidden``) and ids; the logits as float32 CPU rows."""
        start, k = len(self.cached), len(token_ids)
        self._features[start:start + k] = hidden[:k]
        self.cached.extend(token_ids)
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        return logits.float().cpu()  # the engine's acceptance arithmetic runs on the CPU

    def forward_tree(self, token_ids: list[int], parents: list[int]) -> torch.Tensor:
        return self.forward(token_ids, len(token_ids), TreeLayout(parents))

    def keep_branch(self, start: int, nodes: list[int]) -> None:
        """The kept nodes' keys were rotated for position ``start + depth``, which is where they now sit."""
        src = torch.tensor(nodes, dtype=torch.long, device=self.model.device) + start
        end = start + len(nodes)
        for kv in self._cache:
            kv[:, :, :, start:end] = kv[:, :, :, src]  # advanced indexing copies before writing
        self._features[start:end] = self._features[src]
        self.cached[start:] = [self.cached[i] for i in src.tolist()]

    def features(self, start: int, end: int) -> torch.Tensor | None:
        if not 0 <= start <= end <= len(self.cached):
            return None
        return self._features[start:end]

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.cached)
        return [(kv[0, :, :, :n], kv[1, :, :, :n]) for kv in self._cache]
