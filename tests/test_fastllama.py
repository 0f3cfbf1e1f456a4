"""The lean Llama forward computes the same function as the Hugging Face module."""

from __future__ import annotations

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.drafters.base import NoDrafter
from specdecode.engine import SpeculativeDecoder
from specdecode.fastllama import FastLlama, FastRunner, supports
from specdecode.runner import ModelRunner

from conftest import DEVICES, on


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_hugging_face_for_prefill_and_blocks(tiny_target, device):
    model = on(tiny_target, device)
    assert supports(model)
    hf, fast = ModelRunner(model), FastRunner(FastLlama(model, tune=False), capacity=8)
    ids = list(range(10, 40))
    torch.testing.assert_close(fast.forward(ids, len(ids)), hf.forward(ids, len(ids)), atol=1e-4, rtol=1e-4)
    for block in ([5], [6, 7], [8, 9, 10, 11, 12]):  # also grows the cache past its capacity
        torch.testing.assert_close(fast.forward(block, len(block)), hf.forward(block, len(block)), atol=1e-4, rtol=1e-4)
    hf.truncate(31)
    fast.truncate(31)
    torch.testing.assert_close(fast.forward([99, 98], 2), hf.forward([99, 98], 2), atol=1e-4, rtol=1e-4)
    for (kf, vf), (kh, vh) in zip(fast.cache_tensors(), hf.cache_tensors()):
        torch.testing.assert_close(kf, kh, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(vf, vh, atol=1e-4, rtol=1e-4)


def test_captured_layers_are_the_hugging_face_hidden_states(tiny_target):
    """Features of lower layers (for heads that read them, EAGLE-3) are those layers' outputs; the
    last layer's stays the output before the final norm, as a runner that captures only it gives."""
    ids = list(range(10, 30))
    plain = FastRunner(FastLlama(tiny_target, tune=False), capacity=8)
    plain.forward(ids, 1)
    wide = FastRunner(FastLlama(tiny_target, tune=False), capacity=8)
    wide.capture_layers((0, 1))
    wide.forward(ids[:12], 1)
    wide.forward(ids[12:], 1)  # grows the cache and the feature buffer past its capacity
    with torch.no_grad():
        hidden = tiny_target(torch.tensor([ids]), output_hidden_states=True).hidden_states  # [embeddings, layer 0, ...]
    h = tiny_target.config.hidden_size
    features = wide.features(0, len(ids))
    assert features.shape == (len(ids), 2 * h)
    torch.testing.assert_close(features[:, :h], hidden[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features[:, h:], plain.features(0, len(ids)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[:, :h], features[:, h:], atol=1e-2)  # negative control: the layers differ
    with pytest.raises(ValueError, match="end with the last layer 1"):
        wide.capture_layers((0,))
    wide.capture_layers(None)  # what a head built without feature_layers asks for: the last layer only
    wide.forward(ids, 1)
    torch.testing.assert_close(wide.features(0, len(ids)), plain.features(0, len(ids)), atol=1e-5, rtol=1e-5)


def test_both_layouts_give_the_same_products(tiny_target):
    fast = FastLlama(tiny_target, tune=False)
    x = torch.randn(3, tiny_target.config.hidden_size)
    lin = fast.lm_head
    lin.use_wt = [True] * len(lin.use_wt)
    a = lin(x)
    lin.use_wt = [False] * len(lin.use_wt)
    torch.testing.assert_close(lin(x), a, atol=1e-4, rtol=1e-4)


def test_default_target_greedy_output_unchanged_by_fast_path(default_target):
    cfg = GenerationConfig(max_new_tokens=40)
    prompts = ["Explain photosynthesis in two sentences.", "What is 17 times 3?"]
    for prompt in prompts:
        slow = SpeculativeDecoder(default_target.model, default_target.tokenizer, NoDrafter(), fast=False)
        fast = SpeculativeDecoder(default_target.model, default_target.tokenizer, NoDrafter(), fast=True)
        assert fast.generate(prompt, cfg).token_ids == slow.generate(prompt, cfg).token_ids
