"""One request's side of a decoding step (``batching.engine``, the one loop): its admission (the
config checked, its seed, output and noise), the acceptance rule applied to its scored block, and
the step's record.

The rule is the coupled one (``verify.verify_tree_coupled``) for every request, greedy or sampled,
chain or tree: the target's token at each output position is its Gumbel-max sample under noise
keyed by the request's seed and that position (``sampling.PositionNoise``), and a drafted token is
accepted exactly when it is that token. Every emitted token is therefore the token plain decoding
with the same seed emits, whatever was drafted, however long the blocks and whatever shared the
pass: a seeded request gives the same text from ``generate``, ``serve`` alone and ``serve`` in any
batch. Under greedy decoding it is the argmax rule. For one-hot drafts (n-gram lookup, trees) it
accepts a token x with chance ``target(x)``, as the standard rule does; a sampled chain accepts x
with chance ``target(x)`` where the standard rule's is ``min(1, target(x) / draft(x))``, unless the
drafter draws with the same noise (``DraftPlan.noise``), which it does here: then it proposes the
target's own token wherever the two distributions agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from .config import ConfigError, GenerationConfig
from .drafters.base import Draft, DraftPlan
from .sampling import PositionNoise, TokenLogprob, logits_to_probs, token_logprobs
from .stats import RunStats, StepRecord
from .text import Output
from .verify import Verdict, verify_tree_coupled


@dataclass
class StreamEvent:
    text: str  # new text since the previous event (may be empty while a stop string is pending)
    token_ids: list[int]  # new token ids
    step: StepRecord | None = None
    finish_reason: str | None = None  # "stop" or "length" on the last event
    stats: RunStats | None = None  # on the last event
    seed: int | None = None  # the seed the generation ran with (drawn when none was given), for reproducing it
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked for


@dataclass(frozen=True)
class Admitted:
    """A request let in: its config validated, its output, its seed and its noise."""

    config: GenerationConfig
    output: Output
    seed: int  # the configured one, else a fresh one (reported back, to reproduce it)
    noise: PositionNoise | None  # by output position; None under greedy decoding (no noise)


def admit(prompt_ids: list[int], config: GenerationConfig, limit: int, holder: str, tokenizer,
          eos_ids: set[int], vocab: int) -> Admitted:
    """Let a request in: ConfigError naming the parameter where the config is out of range, the
    prompt is empty, or the prompt and all the output do not fit in the ``limit`` tokens of
    ``holder`` (0: no limit). ``vocab``: the logits' columns its noise covers."""
    config = config.validate()
    if not prompt_ids:
        raise ConfigError("prompt", "must not be empty")
    if limit and len(prompt_ids) + config.max_new_tokens > limit:
        raise ConfigError("max_new_tokens", f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                                            f"({config.max_new_tokens}) exceeds {holder} of {limit} tokens")
    seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little")
    output = Output(tokenizer, eos_ids, config.stop, config.max_new_tokens, config.ignore_eos)
    return Admitted(config, output, seed, None if config.greedy else PositionNoise(seed, vocab))


def with_noise(plan: DraftPlan, noise: PositionNoise | None, at: int) -> DraftPlan:
    """``plan`` with the noise of the output positions its drafted tokens would take (``at``: the
    position of the first), for a sampling drafter to draw with (``DraftPlan.noise``)."""
    if noise is None:
        return plan
    return replace(plan, noise=lambda i: noise.row(at + i))


@dataclass(frozen=True)
class Settled:
    """A scored block after the acceptance rule."""

    verdict: Verdict  # accepted drafted tokens, then the target's recovered or bonus token
    branch: list[int]  # the drafted indices accepted, root first (a chain: 0 .. accepted - 1)
    rows: list[int]  # the logits row each emitted token came from: 0, then each accepted index + 1


def settle(draft: Draft, logits: torch.Tensor, config: GenerationConfig, noise: PositionNoise | None,
           at: int) -> Settled:
    """Apply the coupled rule to one request's scored block. logits: ``[len(draft) + 1, vocab]``,
    row 0 at the pending token, row i + 1 at drafted token i; ``at``: the output position the
    pending token's row decides."""
    target_probs = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)  # [len(draft) + 1, V]
    parents = list(range(-1, len(draft) - 1)) if draft.parents is None else draft.parents
    rows_noise = None if noise is None else noise.rows(at, draft.depth() + 1)  # [depth + 1, V]
    branch, verdict = verify_tree_coupled(draft.tokens, parents, target_probs, rows_noise)
    return Settled(verdict, branch, [0] + [i + 1 for i in branch])


def emitted_logprobs(logits: torch.Tensor, settled: Settled, new: list[int],
                     config: GenerationConfig) -> list[TokenLogprob]:
    """The log-probabilities of the tokens a step kept (``new``), when the request asks for them."""
    if config.logprobs is None:
        return []
    return token_logprobs(logits[settled.rows[: len(new)]], new, config.logprobs)


def step_record(step: int, allowed: int, draft: Draft, settled: Settled, emitted: int, draft_s: float,
                verify_s: float, overhead_s: float, prompt_tokens: int = 0) -> StepRecord:
    """``prompt_tokens``: the prompt's last chunk where the step's pass read it (its block then
    holds those tokens, the pending one last, and no draft)."""
    return StepRecord(step, allowed, len(draft), settled.verdict.num_accepted, emitted, draft_s, verify_s,
                      overhead_s, prompt_tokens or len(draft) + 1, None if draft.parents is None else draft.depth(),
                      prompt_tokens)
