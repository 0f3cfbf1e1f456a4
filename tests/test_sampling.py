import pytest
import torch

from specdecode.sampling import logits_to_probs, sample


def test_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, 3.0, -1.0]])
    probs = logits_to_probs(logits, 0.0)
    assert probs.tolist() == [[0, 1, 0], [1, 0, 0]]  # ties go to the first index, as torch.argmax


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(logits_to_probs(logits, 0.5), torch.softmax(logits / 0.5, -1))


def test_top_k_keeps_k_largest():
    probs = logits_to_probs(torch.tensor([1.0, 4.0, 3.0, 2.0]), 1.0, top_k=2)
    assert probs[0] == 0 and probs[3] == 0
    assert torch.allclose(probs[1:3], torch.softmax(torch.tensor([4.0, 3.0]), -1))


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.6, 2), (0.85, 2), (0.86, 3), (1.0, 4)])
def test_top_p_keeps_smallest_prefix_reaching_mass(top_p, kept):
    base = torch.tensor([0.5, 0.35, 0.1, 0.05])
    probs = logits_to_probs(base.log(), 1.0, top_p=top_p)
    assert int((probs > 0).sum()) == kept
    assert torch.allclose(probs[:kept], base[:kept] / base[:kept].sum())


def test_sample_is_reproducible_with_seeded_generator():
    probs = torch.softmax(torch.randn(100), -1)
    a = [sample(probs, torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [sample(probs, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == b


def test_argmax_takes_the_first_index_on_ties_as_torch_does():
    from specdecode.sampling import argmax

    gen = torch.Generator().manual_seed(0)
    for shape in [(7,), (3, 11), (2, 4096)]:
        for _ in range(50):
            x = torch.randint(0, 3, shape, generator=gen).float()  # many ties
            assert torch.equal(argmax(x), x.argmax(dim=-1)), shape
    strided = torch.randn(4, 64, generator=gen)[:, ::3]
    assert torch.equal(argmax(strided), strided.argmax(dim=-1))
    half = torch.tensor([[0.5, 2.0, 2.0]], dtype=torch.bfloat16)  # not through NumPy
    assert argmax(half).tolist() == [1]


def _top_p_by_full_sort(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference: sort the whole vocabulary, keep a token while the mass before it is below top_p."""
    sorted_probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
    drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.softmax(logits.masked_fill(drop, float("-inf")), dim=-1)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat to peaked: the nucleus from thousands of tokens to one
def test_top_p_keeps_what_a_full_sort_keeps(top_p, scale):
    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(7)) * scale
    assert torch.equal(logits_to_probs(logits, 0.8, 0, top_p), _top_p_by_full_sort(logits / 0.8, top_p))


def test_top_p_keeps_every_token_tied_with_the_last_one_kept():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -5.0]])
    probs = logits_to_probs(logits, 1.0, 0, 0.5)  # the first alone holds under half: one of the tied three ends it
    assert (probs[0, 1:4] > 0).all() and probs[0, 4] == 0
