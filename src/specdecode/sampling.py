"""Logits -> sampling distribution, the one function both the drafter and the verifier use.

Using the same transform on both sides matters for losslessness: the verifier's acceptance test
compares the *draft's actual sampling distribution* with the *target's actual sampling
distribution*. If one side applied top-p and the other did not, the output would silently drift
from the target's (a known failure mode of assisted generation implementations).
"""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Turn logits ``[..., vocab]`` into the distribution tokens are drawn from, ``[..., vocab]`` float32.

    temperature == 0 is greedy decoding: the distribution is one-hot on the argmax (first index on
    ties, as ``torch.argmax``), so greedy and sampling share one acceptance rule.
    Top-k keeps the k largest logits, then top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches top_p (the most likely token is always kept).
    """
    logits = logits.float()
    if temperature == 0.0:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        return probs
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # mass strictly before each token; a token is kept while that mass is still below top_p
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a distribution ``[vocab]``. One-hot distributions need no randomness."""
    return int(torch.multinomial(probs, 1, generator=generator).item())
