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

Every request is settled by the coupled rule below (``verify_tree_coupled``, through
``step.settle``, in the one decoding loop): it emits what plain decoding with the request's seed
emits, so a seeded request's tokens do not depend on its drafts or its batch. ``verify`` and
``verify_tree`` are the standard rules, kept out of the hot path as the reference the coupled one
is held to (the tests; ``scripts/coupled_acceptance.py``); they read ``Draft.probs``, which a
drafter builds only when its plan asks (``DraftPlan.keep_probs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import argmax, gumbel_argmax, sample


@dataclass(frozen=True)
class Verdict:
    num_accepted: int  # accepted drafted tokens (0..tau)
    tokens: list[int]  # accepted drafted tokens followed by the recovered or bonus token


def acceptance_probs(
    draft_tokens: list[int], draft_probs: torch.Tensor | None, target_probs: torch.Tensor
) -> torch.Tensor:
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


def _children(parents: list[int]) -> dict[int, list[int]]:
    """node -> its children in drafted order (-1: the pending token)."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    return children


def verify_tree(draft_tokens: list[int], draft_parents: list[int], target_probs: torch.Tensor,
                generator: torch.Generator | None) -> tuple[list[int], Verdict]:
    """The acceptance rule over a tree of drafted tokens (``Draft.parents``), greedy or sampling.

    The candidates are one-hot drafts (chosen by the drafter without looking at the target), so the
    rule at a node is sequential rejection: its children are tried in drafted order, child x is
    accepted with probability ``r(x)`` where ``r`` is the target's distribution at the node with the
    children already rejected taken out and renormalised (``residual_distribution`` with a one-hot
    draft); an accepted child becomes the node, and where none is accepted the recovered token is
    drawn from ``r``. Each emitted token is an exact sample of the target ``p``: with ``m`` the mass
    of ``p`` left after children 1..j-1, child j is reached with probability ``m`` and accepted with
    ``p(c_j) / m``, so it is emitted with probability ``p(c_j)``; any other token also with ``p``
    (SpecInfer's multi-candidate rejection, Miao et al. 2024, for one-hot drafts). Under greedy
    decoding ``p`` is one-hot and this follows the target's argmax down the tree: the accepted branch
    is what a chain holding it would have accepted, so output stays identical to plain decoding.

    target_probs: ``[len(draft_tokens) + 1, vocab]``: row 0 at the pending token, row i + 1 at
    drafted token i. Returns the drafted indices on the accepted branch, root first, and the verdict.
    """
    assert target_probs.shape[0] == len(draft_tokens) + 1, "target must score the pending token and every node"
    children = _children(draft_parents)
    branch, node = [], -1
    while True:
        row = target_probs[node + 1]
        for child in children.get(node, ()):
            tok = draft_tokens[child]
            if float(torch.rand((), generator=generator)) < float(row[tok]):
                break
            row = residual_distribution(row, None, tok)
        else:  # no child accepted (or a leaf): the target's own token from what is left
            return branch, Verdict(len(branch), [draft_tokens[i] for i in branch] + [sample(row, generator)])
        node = child
        branch.append(node)


def verify_coupled(draft_tokens: list[int], target_probs: torch.Tensor, noise: torch.Tensor | None) -> Verdict:
    """The coupled acceptance rule for one-hot drafts (drafts chosen without looking at ``noise``,
    as n-gram lookup's are): the target's token at each position is its Gumbel-max sample under
    that position's own noise, ``argmax(log target_probs[i] + noise[i])``; a drafted token is
    accepted exactly when it is that token, and the first that is not is replaced by it.

    Every emitted token is then the token plain decoding with the same noise would have emitted, so
    a seeded request's output does not depend on the drafter, the draft lengths or the batch it ran
    in; and it is an exact sample of the target (the Gumbel-max trick). For one-hot drafts a token
    x is accepted with chance ``target_probs[i, x]``, as under ``verify``: the coupling costs no
    acceptance.

    target_probs: ``[tau + 1, vocab]``; noise: ``[tau + 1, vocab]`` (``sampling.position_noise`` of
    each output position), or None under greedy decoding, where ``target_probs`` is one-hot.
    """
    chain = list(range(-1, len(draft_tokens) - 1))
    return verify_tree_coupled(draft_tokens, chain, target_probs, noise)[1]


def verify_tree_coupled(draft_tokens: list[int], draft_parents: list[int], target_probs: torch.Tensor,
                        noise: torch.Tensor | None) -> tuple[list[int], Verdict]:
    """The coupled rule (``verify_coupled``) over a tree of one-hot candidates (``Draft.parents``):
    from the pending token down, the target's token at a node is its Gumbel-max sample under the
    noise of the node's output position (its depth); the child holding that token, if there is
    one, is accepted and becomes the node, and where none does the target's token ends the block.
    Emitted tokens are those of plain decoding with the same noise, however the tree was drawn.

    target_probs: ``[len(draft_tokens) + 1, vocab]``, row 0 at the pending token, row i + 1 at
    drafted token i; noise: ``[depth + 1, vocab]``, one row per output position, or None (greedy).
    Returns the drafted indices on the accepted branch, root first, and the verdict."""
    assert target_probs.shape[0] == len(draft_tokens) + 1, "target must score the pending token and every node"
    depth = [0]  # of each row: the pending token, then the nodes
    for p in draft_parents:
        depth.append(depth[p + 1] + 1)
    if noise is None:
        chosen = argmax(target_probs).tolist()
    else:
        assert noise.shape[0] > max(depth) and noise.shape[1] == target_probs.shape[1], "noise per output position"
        chosen = gumbel_argmax(target_probs, noise[depth]).tolist()
    children = _children(draft_parents)
    branch, node = [], -1
    while True:
        want = chosen[node + 1]
        node = next((c for c in children.get(node, ()) if draft_tokens[c] == want), None)
        if node is None:
            return branch, Verdict(len(branch), [draft_tokens[i] for i in branch] + [want])
        branch.append(node)
