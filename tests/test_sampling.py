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
