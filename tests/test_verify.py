"""The acceptance rule preserves the target's distribution.

An exact check (enumerate every draft and every branch of the rule, no sampling), a seeded Monte
Carlo check of ``verify`` itself, and negative controls: rules that are subtly wrong must fail the
same checks, or the checks prove nothing.
"""

import functools
import itertools
import math
from collections import Counter

import pytest
import torch

from specdecode.sampling import gumbel_argmax, position_noise
from specdecode.verify import acceptance_probs, residual_distribution, verify, verify_coupled

V = 3  # vocabulary of the exact check


@functools.lru_cache(maxsize=None)
def _dist(seed: int, prefix: tuple, sharp: float) -> torch.Tensor:
    """A fixed distribution over V tokens that depends on the prefix (like a real model)."""
    g = torch.Generator().manual_seed(hash((seed,) + prefix) % (2**31))
    return torch.softmax(torch.randn(V, generator=g).double() * sharp, -1)


def target_dist(prefix):
    return _dist(1, prefix, 1.5)


def draft_dist(prefix):
    return _dist(2, prefix, 2.5)


def correct_rule(accept, target_row, draft_row, drafted):
    return accept, residual_distribution(target_row, draft_row, drafted)


def step_outcomes(prefix, tau, rule):
    """Every (emitted tokens, probability) one step can produce, enumerated exactly."""
    out = []
    for drafted in itertools.product(range(V), repeat=tau):
        q_rows = [draft_dist(prefix + drafted[:i]) for i in range(tau)]
        p_rows = torch.stack([target_dist(prefix + drafted[:i]) for i in range(tau + 1)])
        prob_draft = math.prod(float(q_rows[i][drafted[i]]) for i in range(tau))
        accept = acceptance_probs(list(drafted), torch.stack(q_rows), p_rows)
        reach = prob_draft  # probability of drafting this block and accepting positions < i
        for i in range(tau):
            a, residual = rule(float(accept[i]), p_rows[i], q_rows[i], drafted[i])
            for y in range(V):
                out.append((drafted[:i] + (y,), reach * (1 - a) * float(residual[y])))
            reach *= a
        for y in range(V):  # all accepted: bonus token from the last position
            out.append((drafted + (y,), reach * float(p_rows[tau][y])))
    return out


def sequence_distribution(length, tau, rule):
    """Distribution of the first ``length`` generated tokens when steps repeat until that many."""
    dist = Counter()
    frontier = [((), 1.0)]
    while frontier:
        prefix, prob = frontier.pop()
        for emitted, p in step_outcomes(prefix, tau, rule):
            seq = prefix + emitted
            if len(seq) >= length:
                dist[seq[:length]] += prob * p
            else:
                frontier.append((seq, prob * p))
    return dist


def target_sequence_distribution(length):
    out = {}
    for seq in itertools.product(range(V), repeat=length):
        out[seq] = math.prod(float(target_dist(seq[:i])[seq[i]]) for i in range(length))
    return out


def max_error(length, tau, rule):
    got = sequence_distribution(length, tau, rule)
    want = target_sequence_distribution(length)
    return max(abs(got.get(s, 0.0) - p) for s, p in want.items())


@pytest.mark.parametrize("tau, length", [(1, 3), (2, 3), (3, 2)])
def test_exact_distribution_is_the_targets(tau, length):
    # length > 1 spans several steps: the recovered/bonus token's conditioning is checked too
    assert max_error(length, tau, correct_rule) < 1e-9


def accept_everything(accept, target_row, draft_row, drafted):
    return 1.0, residual_distribution(target_row, draft_row, drafted)


def resample_from_target(accept, target_row, draft_row, drafted):
    return accept, target_row  # forgets to subtract the draft on rejection


@pytest.mark.parametrize("wrong_rule", [accept_everything, resample_from_target])
def test_exact_check_catches_wrong_rules(wrong_rule):
    assert max_error(3, 2, wrong_rule) > 1e-3


# ---- Monte Carlo: verify() itself, with a seeded generator ----------------------------------------
MC_VOCAB, MC_DRAWS = 6, 20000
# Tolerance: total-variation distance. With 20000 draws over 6 outcomes the expected TV of a
# correct sampler is ~0.007 (sum of sqrt(p(1-p)/(2*pi*n)) ~ 0.0065); 0.02 is about 3x that.
MC_TV_TOLERANCE = 0.02


def _mc_setup():
    g = torch.Generator().manual_seed(3)
    target = torch.softmax(torch.randn(4, MC_VOCAB, generator=g) * 1.5, -1)
    draft = torch.softmax(torch.randn(3, MC_VOCAB, generator=g) * 2.5, -1)
    return target, draft


def first_token_tv(verifier) -> float:
    target, draft = _mc_setup()
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(MC_VOCAB)
    for _ in range(MC_DRAWS):
        tokens = [int(torch.multinomial(draft[i], 1, generator=gen)) for i in range(3)]
        counts[verifier(tokens, draft, target, gen)[0]] += 1
    return 0.5 * float((counts / MC_DRAWS - target[0]).abs().sum())


def test_monte_carlo_first_token_follows_target():
    assert first_token_tv(lambda t, d, p, g: verify(t, d, p, g).tokens) < MC_TV_TOLERANCE


def test_monte_carlo_catches_accept_all():
    assert first_token_tv(lambda t, d, p, g: t) > MC_TV_TOLERANCE


def test_greedy_accepts_exactly_the_argmax_prefix():
    target = torch.zeros(4, 5)
    for i, tok in enumerate([1, 2, 3, 4]):
        target[i, tok] = 1.0
    assert verify([1, 2, 0], None, target, None).tokens == [1, 2, 3]  # third rejected, recovered = argmax
    assert verify([1, 2, 3], None, target, None).tokens == [1, 2, 3, 4]  # all accepted + bonus
    assert verify([], None, target[:1], None).tokens == [1]  # plain decoding


# ---- the coupled rule: Gumbel-max noise keyed by seed and position ------------------------------
def _coupled_first_tokens(rule) -> torch.Tensor:
    """First emitted token over MC_DRAWS seeds, for a fixed one-hot draft of three tokens."""
    target, _ = _mc_setup()
    drafted = [int(target[0].argmin()), 2, 4]  # drafts that do not look at the noise
    counts = torch.zeros(MC_VOCAB)
    for seed in range(MC_DRAWS):
        noise = torch.stack([position_noise(seed, i, MC_VOCAB) for i in range(4)])
        counts[rule(drafted, target, noise)[0]] += 1
    return counts


def test_coupled_rule_first_token_follows_target():
    target, _ = _mc_setup()
    counts = _coupled_first_tokens(lambda t, p, n: verify_coupled(t, p, n).tokens)
    assert 0.5 * float((counts / MC_DRAWS - target[0]).abs().sum()) < MC_TV_TOLERANCE


def test_coupled_rule_monte_carlo_catches_a_rule_favouring_the_draft():
    def top_two(drafted, target_probs, noise):  # accepts a draft that is merely among the best two
        scores = target_probs.log() + noise
        if drafted[0] in scores[0].topk(2).indices.tolist():
            return drafted[:1]
        return [int(scores[0].argmax())]

    target, _ = _mc_setup()
    counts = _coupled_first_tokens(top_two)
    assert 0.5 * float((counts / MC_DRAWS - target[0]).abs().sum()) > MC_TV_TOLERANCE


def test_coupled_rule_emits_what_plain_seeded_decoding_emits_whatever_was_drafted():
    target, _ = _mc_setup()
    for seed in range(200):
        noise = torch.stack([position_noise(seed, i, MC_VOCAB) for i in range(4)])
        plain = [int(gumbel_argmax(target[i], noise[i])) for i in range(4)]
        for drafted in ([], [plain[0]], plain[:2] + [5], plain[:3], [(plain[0] + 1) % MC_VOCAB, 1, 1]):
            verdict = verify_coupled(drafted, target[: len(drafted) + 1], noise[: len(drafted) + 1])
            assert verdict.tokens == plain[: len(verdict.tokens)]
            assert verdict.num_accepted == len(verdict.tokens) - 1


def test_position_noise_depends_on_seed_and_position_only():
    assert torch.equal(position_noise(5, 3, 100), position_noise(5, 3, 100))
    assert not torch.equal(position_noise(5, 3, 100), position_noise(5, 4, 100))
    assert not torch.equal(position_noise(5, 3, 100), position_noise(6, 3, 100))
