"""The lean Llama runner computes the same function as the Hugging Face module."""

from __future__ import annotations

import json

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.drafters.base import NoDrafter
from specdecode.engine import SpeculativeDecoder
from specdecode.runners import HFRunner, LeanLlama, LeanRunner, supports, tuning
from specdecode.runners.tuning import MAX_TUNED, pad_sizes

from conftest import DEVICES, on


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_hugging_face_for_prefill_and_blocks(tiny_target, device):
    model = on(tiny_target, device)
    assert supports(model)
    hf, fast = HFRunner(model), LeanRunner(LeanLlama(model, tune=False), capacity=8)
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
    plain = LeanRunner(LeanLlama(tiny_target, tune=False), capacity=8)
    plain.forward(ids, 1)
    wide = LeanRunner(LeanLlama(tiny_target, tune=False), capacity=8)
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
    fast = LeanLlama(tiny_target, tune=False)
    x = torch.randn(3, tiny_target.config.hidden_size)
    lin = fast.lm_head
    lin.use_wt = [True] * len(lin.use_wt)
    a = lin(x)
    lin.use_wt = [False] * len(lin.use_wt)
    b = lin(x)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # Row-major out of both, and in: a transposed activation sends the next product to a slow kernel.
    assert a.is_contiguous() and b.is_contiguous()
    torch.testing.assert_close(lin(x.t().contiguous().t()), a, atol=1e-4, rtol=1e-4)


def test_layout_tuning_times_whole_passes_once_per_machine(tiny_target, tmp_path, monkeypatch):
    cache_file = tmp_path / "tuning.json"
    fast = LeanLlama(tiny_target, tuning_cache=cache_file)
    choice = fast.lm_head.use_wt
    (timed,) = json.loads(cache_file.read_text()).values()  # one machine and model: one entry
    assert len(choice) == MAX_TUNED + 1 and choice == timed["use_wt"]  # what was timed is what runs
    assert fast.pad_to == pad_sizes(timed["ms"])
    assert all(lin.use_wt == choice for lin in fast.linears())

    def must_not_time(*args, **kwargs):
        raise AssertionError("timed again although the cache holds this machine and model")

    monkeypatch.setattr(tuning, "_time_layouts", must_not_time)
    again = LeanLlama(tiny_target, tuning_cache=cache_file)
    assert again.lm_head.use_wt == choice
    with pytest.raises(AssertionError, match="timed again"):  # control: another cache file is timed
        LeanLlama(tiny_target, tuning_cache=tmp_path / "other.json")


def test_pad_sizes_pick_the_cheapest_larger_block_by_a_margin():
    ms = [0.0, 11.0, 10.0, 14.0, 10.0, 15.0, 18.0, 17.0, 12.0]  # by block size; 0 is unused
    assert pad_sizes(ms) == [0, 1, 2, 4, 4, 8, 8, 8, 8]  # 1 never padded; 2: 10 vs 10 is no gain


def test_padded_passes_give_what_unpadded_ones_do(tiny_target):
    """Blocks run padded to a cheaper size leave the same logits, features, cache and context as
    the same blocks run as they are: sequences, and trees, whose pad tokens are roots of their own."""
    plain = LeanRunner(LeanLlama(tiny_target, tune=False), capacity=8)
    padded = LeanRunner(LeanLlama(tiny_target, tune=False), capacity=8)
    padded.model.pad_to = [0, 1] + [8] * 7 + list(range(9, MAX_TUNED + 1))
    sizes = []
    forward = padded.model.forward_segments
    padded.model.forward_segments = lambda segs, *args: sizes.append(len(segs[0].ids)) or forward(segs, *args)

    def same(a, b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    prompt = list(range(10, 30))
    same(padded.forward(prompt, 1), plain.forward(prompt, 1))
    same(padded.forward([5, 6, 7], 3), plain.forward([5, 6, 7], 3))
    same(padded.forward([8, 9], 0), plain.forward([8, 9], 0))
    start = len(plain.cached)
    tokens, parents = [40, 41, 42, 43, 44], [-1, 0, 0, 1, -1]
    same(padded.forward_tree(tokens, parents), plain.forward_tree(tokens, parents))
    for runner in (plain, padded):
        runner.keep_branch(start, [0, 1, 3])
    same(padded.forward([50], 1), plain.forward([50], 1))
    assert sizes == [20, 8, 8, 8, 1]  # control: the short blocks did run padded
    assert padded.cached == plain.cached
    same(padded.features(0, len(plain.cached)), plain.features(0, len(plain.cached)))
    for (kp, vp), (kq, vq) in zip(padded.cache_tensors(), plain.cache_tensors()):
        same(kp, kq)
        same(vp, vq)


def test_default_target_greedy_output_unchanged_by_fast_path(default_target):
    cfg = GenerationConfig(max_new_tokens=40)
    prompts = ["Explain photosynthesis in two sentences.", "What is 17 times 3?"]
    for prompt in prompts:
        slow = SpeculativeDecoder(default_target.model, default_target.tokenizer, NoDrafter(), fast=False)
        fast = SpeculativeDecoder(default_target.model, default_target.tokenizer, NoDrafter(), fast=True)
        assert fast.generate(prompt, cfg).token_ids == slow.generate(prompt, cfg).token_ids
