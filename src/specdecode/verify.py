"""The acceptance rule of speculative decoding: pure tensors in, accepted count and tokens out.

Vocabulary, used the same way everywhere in this package:

* **drafted** tokens: the tau tokens a drafter proposed for one step.
* **accepted** tokens: the longest prefix of the drafted block that passed the test below; the first
  rejection ends it (step 4 of the algorithm).
* **recovered** token: on a rejection at position i, the token the target contributes instead, drawn
  from the normalised residual ``max(0, target_probs[i] - draft_probs[i])``.
* **bonus** token: when all tau drafted tokens are accepted, the token the target contributes from
  its distribution at position tau + 1, which the same forward pass already computed.

Every step therefore *emits* ``accepted + 1`` tokens (before stop conditions cut it short).

The rule is Algorithm 1 of Leviathan et al. 2023 ("Fast Inference from Transformers via
Speculative Decoding") and Chen et al. 2023 ("Accelerating LLM decoding with speculative sampling"):
accept drafted token x at position i with probability ``min(1, target_probs[i, x] / draft_probs[i, x])``.
This makes every emitted token an exact sample of the target's distribution. Greedy decoding is the
special case where both distributions are one-hot (see ``sampling.logits_to_probs``): then the test
accepts exactly when the drafted token is the target's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample


@dataclass(frozen=True)
class Verdict:
    num_accepted: int  # accepted drafted tokens (0..tau)
    tokens: list[int]  # accepted drafted tokens followed by the recovered or bonus token


def acceptance_probs(draft_tokens: list[int], draft_probs: torch.Tensor | None, target_probs: torch.Tensor) -> torch.Tensor:
    """``[tau]``: the chance each drafted token is accepted, ``min(1, target/draft)`` at its position."""
    tau = len(draft_tokens)
    idx = torch.tensor(draft_tokens, dtype=torch.long)
    rows = torch.arange(tau)
    target_at = target_probs[rows, idx]
    if draft_probs is None:  # one-hot drafts: draft probability 1
        return target_at.clamp(max=1.0)
    return (target_at / draft_probs[rows, idx]).clamp(max=1.0)


def residual_distribution(target_row: torch.Tensor, draft_row: torch.Tensor | None, drafted: int) -> torch.Tensor:
    """``[vocab]``: the distribution a recovered token is drawn from after ``drafted`` was rejected:
    ``max(0, target - draft)`` normalised (one-hot drafts: the target without the drafted token)."""
    residual = target_row.clone()
    if draft_row is None:
        residual[drafted] = 0.0
    else:
        residual = (residual - draft_row).clamp_(min=0.0)
    total = residual.sum()
    # total == 0 only if target == draft exactly, where rejection has probability 0;
    # guard against float round-off anyway by falling back to the target itself.
    return residual / total if total > 0 else target_row


def verify(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Apply the acceptance rule to one drafted block.

    draft_tokens: the tau drafted token ids.
    draft_probs: ``[tau, vocab]``, the exact distribution each drafted token was drawn from, or None
        when every draft is one-hot on its token (greedy drafts, n-gram lookup).
    target_probs: ``[tau + 1, vocab]``, the target's sampling distribution at each drafted position
        and one more (for the bonus token).
    generator: the source of randomness (uniforms for the test, draws for recovered/bonus tokens).
    """
    tau = len(draft_tokens)
    assert target_probs.shape[0] == tau + 1, "target must score tau + 1 positions"
    if tau:
        accept = acceptance_probs(draft_tokens, draft_probs, target_probs)  # [tau]
        uniforms = torch.rand(tau, generator=generator)
        rejected = (uniforms >= accept).nonzero()
        if len(rejected):
            i = int(rejected[0])
            draft_row = None if draft_probs is None else draft_probs[i]
            recovered = sample(residual_distribution(target_probs[i], draft_row, draft_tokens[i]), generator)
            return Verdict(i, list(draft_tokens[:i]) + [recovered])
    return Verdict(tau, list(draft_tokens) + [sample(target_probs[tau], generator)])


def verify_tree_greedy(draft_tokens: list[int], draft_parents: list[int], target_logits: torch.Tensor) -> tuple[list[int], Verdict]:
    """Greedy acceptance over a tree of drafted tokens (``Draft.parents``): from the pending token,
    follow the child whose token is the target's argmax there, as long as there is one; the
    target's argmax at the last accepted node is the recovered or bonus token. The accepted branch
    is exactly what a chain holding that branch would have accepted, so output stays identical to
    plain greedy decoding.

    target_logits: ``[len(draft_tokens) + 1, vocab]``: row 0 at the pending token, row i + 1 at
    drafted token i. Returns the drafted indices on the accepted branch, root first, and the verdict.
    """
    assert target_logits.shape[0] == len(draft_tokens) + 1, "target must score the pending token and every node"
    choice = target_logits.argmax(dim=-1).tolist()
    children: dict[tuple[int, int], int] = {}  # (parent, token) -> drafted index
    for i, (tok, parent) in enumerate(zip(draft_tokens, draft_parents)):
        children.setdefault((parent, tok), i)
    branch, node = [], -1
    while (node, choice[node + 1]) in children:
        node = children[(node, choice[node + 1])]
        branch.append(node)
    return branch, Verdict(len(branch), [draft_tokens[i] for i in branch] + [choice[node + 1]])
