"""The verification budget: how many drafted tokens each request in a batch sends to the target's
pass.

Every running request puts its pending token into the pass (it advances by at least one token
every step: no request starves). Each drafted token it adds is worth its chance of being accepted
together with the drafted tokens before it (``policy.PositionAcceptance.survival``) and costs its
share of a longer pass (``PassCost``). The drafted tokens of all requests are ranked by that chance
and the pass takes the prefix of the ranking with the most expected emitted tokens per second of
pass (prompt tokens read in the pass count as work done, like emitted tokens). On a CPU a pass
costs about a fixed part per micro-batch plus a part per token: with one request the fixed part
dominates and drafting pays down to modest chances; with many requests, or a prompt being read,
one more drafted token costs about what a needed token costs, and speculation shrinks to the
tokens that are nearly sure, then to none; it comes back as the batch empties.

Chosen: throughput over the batch (expected tokens per second), with every request advancing each
step, rather than per-request latency targets or priorities: an OpenAI request carries neither,
and with no request starved each one's latency falls as the batch's throughput rises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

MAX_RANKED = 128  # drafted tokens considered per step (at most 7 for each of up to 16-32 requests)


def one_batch(blocks: dict[int, int]) -> int:
    """Micro-batches a pass runs in when its blocks are computed together (one)."""
    return 1


@dataclass
class PassCost:
    """Seconds of a target pass over n tokens run as u micro-batches: ``fixed_s * u + per_token_s *
    n``. llama.cpp runs a pass over several sequences as micro-batches that each take the same
    number of tokens from a run of consecutive sequences (``runners.llamacpp_batch.micro_batches``),
    and each micro-batch pays the fixed part again: one drafted token in a request whose neighbours
    drafted nothing costs a micro-batch of its own. Fitted to the passes the engine times
    (exponentially weighted least squares, so the fit follows the machine)."""

    fixed_s: float
    per_token_s: float
    decay: float = 0.98
    _sums: list[float] = field(default_factory=lambda: [0.0] * 5, repr=False)  # uu, un, nn, ut, nt

    def seconds(self, tokens: int, micro_batches: int = 1) -> float:
        return self.fixed_s * micro_batches + self.per_token_s * tokens

    def observe(self, tokens: int, seconds: float, micro_batches: int = 1) -> None:
        s, u, n = self._sums, micro_batches, tokens
        for i, v in enumerate((u * u, u * n, n * n, u * seconds, n * seconds)):
            s[i] = s[i] * self.decay + v
        det = s[0] * s[2] - s[1] * s[1]
        if det > 1e-6 * s[0] * s[2]:  # pass shapes varied enough to tell the two parts apart
            fixed = (s[2] * s[3] - s[1] * s[4]) / det
            per = (s[0] * s[4] - s[1] * s[3]) / det
            if fixed >= 0 and per > 0:
                self.fixed_s, self.per_token_s = fixed, per

    @classmethod
    def measure(cls, time_pass: Callable[[int], float], sizes=(1, 4, 16, 64), reps: int = 3) -> "PassCost":
        """Fitted to ``time_pass(n)``, the seconds of a one-micro-batch pass over n tokens, at a few
        sizes."""
        cost = cls(0.0, 0.0)
        for _ in range(reps):
            for n in sizes:
                cost.observe(n, time_pass(n))
        return cost


@dataclass(frozen=True)
class Request:
    """One running request as the budget sees it."""

    slot: int
    survival: list[float]  # chance that its drafted tokens 1..k are all accepted (non-increasing)


def allocate(requests: list[Request], other: dict[int, int], cost: PassCost, max_tokens: int,
             split: Callable[[dict[int, int]], int] = one_batch) -> dict[int, int]:
    """Block length (1 + drafted tokens sent) per request's slot.

    other: slot -> tokens already in the pass for other slots (prompt chunks, fixed-length
    blocks). They count as work done, one unit each like an emitted token: a prompt has to be
    read, and a pass that reads one is not cheap to fill with guesses.
    max_tokens: the most tokens the pass may hold, those included.
    split: the number of micro-batches a pass of these blocks (slot -> tokens) runs in.
    """
    lengths = {r.slot: 1 for r in requests}
    blocks = {**other, **lengths}
    base = sum(other.values())
    value, tokens = float(len(requests) + base), base + len(requests)
    best, best_rate = dict(lengths), value / cost.seconds(tokens, split(blocks))
    ranked = sorted(((chance, r.slot) for r in requests for chance in r.survival), key=lambda x: -x[0])
    for chance, slot in ranked[:MAX_RANKED]:  # within a request the chances fall, so its tokens come in order
        if tokens + 1 > max_tokens:
            break
        # a token can merge micro-batches and make the pass cheaper, but no pass costs less than
        # one micro-batch: once neither the tokens left (worth at most this chance, each at least
        # a token's time) nor this prefix priced as one micro-batch beat the best rate, no longer
        # prefix can
        if chance < best_rate * cost.per_token_s and value <= best_rate * cost.seconds(tokens):
            break
        lengths[slot] += 1
        blocks[slot] += 1
        value += chance
        tokens += 1
        rate = value / cost.seconds(tokens, split(blocks))
        if rate > best_rate * 1.0001:
            best, best_rate = dict(lengths), rate
    return best
