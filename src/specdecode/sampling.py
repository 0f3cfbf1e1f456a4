"""Logits -> sampling distribution, the one function both the drafter and the verifier use.

Using the same transform on both sides matters for losslessness: the verifier's acceptance test
compares the *draft's actual sampling distribution* with the *target's actual sampling
distribution*. If one side applied top-p and the other did not, the output would silently drift
from the target's (a known failure mode of assisted generation implementations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)``: the first index on ties, as ``torch.argmax``. A float32 CPU tensor goes
    through NumPy, whose reduction over a vocabulary row is about ten times faster than torch's
    here (every greedy step takes one per scored position)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(np.asarray(x.numpy().argmax(axis=-1)))
    return x.argmax(dim=-1)


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
        probs.scatter_(-1, argmax(logits).unsqueeze(-1), 1.0)
        return probs
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = logits.masked_fill(~_nucleus(torch.softmax(logits, dim=-1), top_p), float("-inf"))
    return torch.softmax(logits, dim=-1)


TOP_P_CANDIDATES = 64  # the largest probabilities top-p looks at first; 8 times more while they fall short


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[..., vocab]`` bool: the tokens top-p keeps. In descending order of probability, a token is
    kept while the mass strictly before it is below ``top_p`` (the likeliest always), and so is
    every token as likely as the last one kept. Only the largest probabilities are sorted: the
    ``TOP_P_CANDIDATES`` largest, more where they hold less than ``top_p``; a full sort of the
    vocabulary cost several milliseconds a step."""
    vocab, k = probs.shape[-1], min(TOP_P_CANDIDATES, probs.shape[-1])
    while True:
        largest = torch.topk(probs, k, dim=-1).values  # [..., k], descending
        mass = torch.cumsum(largest, dim=-1)
        if k == vocab or bool((mass[..., -1] >= top_p).all()):
            break
        k = min(vocab, 8 * k)
    kept = ((mass - largest) < top_p).sum(dim=-1, keepdim=True)  # >= 1: the first has nothing before it
    return probs >= largest.gather(-1, kept - 1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a distribution ``[vocab]``. One-hot distributions (greedy decoding)
    need no randomness: their token is taken without a draw, which costs far less than one."""
    if int(torch.count_nonzero(probs)) == 1:
        return int(argmax(probs))
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _mix(seed: int, position: int) -> int:
    """A 63-bit seed for one output position, from the request's seed (splitmix64's finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) >> 1


def position_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """``[vocab]`` Gumbel noise for output position ``position`` of a request seeded with ``seed``:
    the same noise whatever was drafted, however long the blocks and whatever else shared the pass,
    so that a seeded request's tokens depend on its seed alone (``verify.verify_coupled``)."""
    generator = torch.Generator().manual_seed(_mix(seed, position))
    uniform = torch.rand(vocab, generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(uniform))


class PositionNoise:
    """A seeded request's noise by output position (``position_noise``), each row drawn once: the
    verifier reads the rows of the positions a block settles, and a sampling drafter the rows of
    the positions it drafts for (``DraftPlan.noise``)."""

    def __init__(self, seed: int, vocab: int):
        self.seed, self.vocab = seed, vocab
        self._rows: dict[int, torch.Tensor] = {}

    def row(self, position: int) -> torch.Tensor:
        """``[vocab]``: output position ``position``'s noise."""
        if position not in self._rows:
            self._rows[position] = position_noise(self.seed, position, self.vocab)
        return self._rows[position]

    def rows(self, start: int, n: int) -> torch.Tensor:
        """``[n, vocab]``: positions ``start .. start + n - 1``; rows before ``start`` are settled and
        are dropped."""
        for settled in [p for p in self._rows if p < start]:
            del self._rows[settled]
        return torch.stack([self.row(start + i) for i in range(n)])


def draw(probs: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None = None) -> int:
    """One token id from ``probs`` ``[vocab]``: its Gumbel-max under ``noise`` (standard Gumbel over
    the same entries) when given, else a draw from ``generator``."""
    if noise is None:
        return sample(probs, generator)
    return int(gumbel_argmax(probs, noise))


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The Gumbel-max trick: ``argmax(log probs + noise)`` over the last axis is an exact sample of
    ``probs`` when ``noise`` is standard Gumbel (and the argmax itself when ``probs`` is one-hot)."""
    return argmax(probs.log() + noise)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # natural log of the target's probability of ``token``
    top: list[tuple[int, float]]  # the likeliest tokens at its position and theirs, best first


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each emitted token's log-probability under the target's raw distribution (before temperature
    and filtering) and the ``top`` likeliest alternatives. logits: ``[len(tokens), vocab]``, row i
    the target's logits where token i was chosen."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    best = torch.topk(logp, top, dim=-1) if top else None
    out = []
    for i, tok in enumerate(tokens):
        alternatives = list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else []
        out.append(TokenLogprob(tok, float(logp[i, tok]), alternatives))
    return out
