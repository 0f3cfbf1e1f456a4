"""The verification budget: how many drafted tokens each request in a batch sends to the target's
pass.

Every running request puts its pending token into the pass (it advances by at least one token
every step: no request starves). Each drafted token it adds is worth its chance of being accepted
together with the drafted tokens before it (``policy.PositionAcceptance.survival``) and costs its
share of a longer pass (``PassCost``). The drafted tokens of all requests are ranked by that chance
and the pass takes the prefix of the ranking with the most expected emitted tokens per second of
pass (prompt tokens read in the pass count as work done, like emitted tokens). On a CPU a pass
costs about a fixed part per micro-batch plus a part per token, and a lone token less than
either suggests (``PassCost``): where the fixed part dominates drafting pays down to modest
chances; where a second token costs what a step does (llama.cpp's matrix-vector kernels on a
lone token) it pays only for nearly sure ones; with many requests, or a prompt being read, one
more drafted token costs about what a needed token costs, and speculation shrinks to the tokens
that are nearly sure, then to none; it comes back as the batch empties.

Chosen: throughput over the batch (expected tokens per second), with every request advancing each
step, rather than per-request latency targets or priorities: an OpenAI request carries neither,
and with no request starved each one's latency falls as the batch's throughput rises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..runners.base import one_batch

MAX_RANKED = 128  # drafted tokens considered per step (at most 7 for each of up to 16-32 requests)

Shape = tuple[int, int]  # a pass's micro-batches, and how many of them hold a single token


@dataclass
class PassCost:
    """Seconds of a target pass over n tokens run as u micro-batches, v of them of a single token:
    ``fixed_s * (u - v) + per_token_s * (n - v) + one_token_s * v``.

    llama.cpp runs a pass over several sequences as micro-batches that each take the same number of
    tokens from a run of consecutive sequences (``runners.llamacpp_batch.micro_batches``), and each
    micro-batch pays the fixed part again: one drafted token in a request whose neighbours drafted
    nothing costs a micro-batch of its own. A micro-batch of one token runs matrix-vector kernels,
    which on a CPU cost much less than the matrix-matrix kernels of two tokens (the default target
    on llama.cpp, 2 cores: about 8 ms against 16 ms), so it has a price of its own: a line through
    the larger passes would put it near 13 ms and make a request decoding alone draft where a
    second token costs what a whole step does. Fitted to the passes the engine times
    (exponentially weighted least squares, so the fit follows the machine) with the start-up
    timings (``measure``) kept beside them at full weight; ``one_token_s`` None:
    a lone token costs ``fixed_s + per_token_s`` until one is timed."""

    fixed_s: float
    per_token_s: float
    one_token_s: float | None = None
    decay: float = 0.98
    _xx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)], repr=False)
    _xy: list[float] = field(default_factory=lambda: [0.0] * 3, repr=False)
    # the start-up timings, never decayed: decoding times mostly one shape (every request's lone
    # token), which alone cannot tell a pass's fixed part from its per-token part
    _prior: tuple[list[list[float]], list[float]] | None = field(default=None, repr=False)

    @property
    def lone_s(self) -> float:
        """Seconds of a micro-batch of one token."""
        return self.fixed_s + self.per_token_s if self.one_token_s is None else self.one_token_s

    def seconds(self, tokens: int, micro_batches: int = 1, singles: int = 0) -> float:
        return (self.fixed_s * (micro_batches - singles) + self.per_token_s * (tokens - singles)
                + self.lone_s * singles)

    def floor(self, tokens: int) -> float:
        """The least any pass over ``tokens`` tokens can cost: one micro-batch, or each token one
        of its own (the cost is linear in how many lone tokens there are, so one extreme is least)."""
        return min(self.fixed_s + self.per_token_s * tokens, self.lone_s * tokens)

    @property
    def least_per_token(self) -> float:
        """The least one more token adds to any pass (``floor`` grows at least this fast)."""
        return min(self.per_token_s, self.lone_s)

    def observe(self, tokens: int, seconds: float, micro_batches: int = 1, singles: int = 0) -> None:
        import numpy as np

        x = (micro_batches - singles, tokens - singles, singles)
        for i in range(3):
            self._xy[i] = self._xy[i] * self.decay + x[i] * seconds
            for j in range(3):
                self._xx[i][j] = self._xx[i][j] * self.decay + x[i] * x[j]
        xx, xy = np.array(self._xx), np.array(self._xy)
        if self._prior is not None:
            xx, xy = xx + np.array(self._prior[0]), xy + np.array(self._prior[1])
        # the parts the passes so far can tell apart: micro-batches and tokens, and lone tokens
        # once some pass had them
        cols = [0, 1] + ([2] if xx[2][2] > 0 else [])
        a = xx[np.ix_(cols, cols)]
        if abs(np.linalg.det(a)) <= 1e-6 * np.prod(np.diag(a)):  # shapes not yet varied enough
            return
        fit = np.linalg.solve(a, xy[cols])
        if fit[0] >= 0 and all(f > 0 for f in fit[1:]):
            self.fixed_s, self.per_token_s = float(fit[0]), float(fit[1])
            if len(cols) == 3:
                self.one_token_s = float(fit[2])

    @classmethod
    def measure(cls, time_pass: Callable[[int], float], sizes=(1, 2, 4, 16, 64), reps: int = 3) -> "PassCost":
        """Fitted to ``time_pass(n)``, the seconds of a one-micro-batch pass over n tokens, at a few
        sizes (one of them a lone token)."""
        cost = cls(0.0, 0.0)
        for n in sizes:
            time_pass(n)  # untimed: llama.cpp builds a graph for a new shape, then reuses it
            for _ in range(reps):
                cost.observe(n, time_pass(n), 1, int(n == 1))
        cost._prior = ([row[:] for row in cost._xx], cost._xy[:])
        cost._xx, cost._xy = [[0.0] * 3 for _ in range(3)], [0.0] * 3
        return cost


@dataclass(frozen=True)
class Request:
    """One running request as the budget sees it."""

    slot: int
    survival: list[float]  # chance that its drafted tokens 1..k are all accepted (non-increasing)


def allocate(requests: list[Request], other: dict[int, int], cost: PassCost, max_tokens: int,
             split: Callable[[dict[int, int]], Shape] = one_batch) -> dict[int, int]:
    """Block length (1 + drafted tokens sent) per request's slot.

    other: slot -> tokens already in the pass for other slots (prompt chunks, fixed-length
    blocks). They count as work done, one unit each like an emitted token: a prompt has to be
    read, and a pass that reads one is not cheap to fill with guesses.
    max_tokens: the most tokens the pass may hold, those included.
    split: the shape (micro-batches, lone-token micro-batches) of a pass of these blocks (slot ->
    tokens).
    """
    lengths = {r.slot: 1 for r in requests}
    blocks = {**other, **lengths}
    base = sum(other.values())
    value, tokens = float(len(requests) + base), base + len(requests)
    best, best_rate = dict(lengths), value / cost.seconds(tokens, *split(blocks))
    ranked = sorted(((chance, r.slot) for r in requests for chance in r.survival), key=lambda x: -x[0])
    for chance, slot in ranked[:MAX_RANKED]:  # within a request the chances fall, so its tokens come in order
        if tokens + 1 > max_tokens:
            break
        # a token can merge micro-batches and make the pass cheaper, but no pass costs less than
        # ``floor``: once neither the tokens left (worth at most this chance, each adding at least
        # ``least_per_token``) nor this prefix at its floor beat the best rate, no longer prefix can
        if chance < best_rate * cost.least_per_token and value <= best_rate * cost.floor(tokens):
            break
        lengths[slot] += 1
        blocks[slot] += 1
        value += chance
        tokens += 1
        rate = value / cost.seconds(tokens, *split(blocks))
        if rate > best_rate * 1.0001:
            best, best_rate = dict(lengths), rate
    return best
