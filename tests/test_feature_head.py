"""The draft head: training sees exactly what drafting will compute, and the drafter's own KV
cache, kept across steps, equals one built afresh."""

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.drafters.base import DraftPlan, NoDrafter
from specdecode.drafters.head import FeatureHead, TargetParts
from specdecode.engine import SpeculativeDecoder
from specdecode.runners import make_runner

from conftest import DEVICES, on, random_head_drafter


@pytest.mark.parametrize("layers", [None, (1, 3)])
def test_unrolled_training_forward_equals_step_by_step_drafting(layers):
    torch.manual_seed(0)
    head = FeatureHead(32, 48, n_heads=4, n_kv=2, head_dim=8, feature_layers=layers).eval()
    if head.fuse is not None:
        torch.nn.init.normal_(head.fuse.weight, std=0.1)  # mixing the layers, not only picking the last
    T = 10
    f, e = torch.randn(1, T, 32 * len(layers or [0])), torch.randn(1, T, 32)
    with torch.no_grad():
        outs = head(f, e, depth=3)
        for m in range(2, T - 2):  # indices 0..m-1 fed by the target, then two drafted steps
            cache = head.new_cache(32)
            g0 = head.step(head.mix(f[0, :m]), e[0, :m], 0, cache)[-1:]
            g1 = head.step(g0, e[0, m:m + 1], m, cache)
            g2 = head.step(g1, e[0, m + 1:m + 2], m + 1, cache)
            torch.testing.assert_close(g0, outs[0][0, m - 1:m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g1, outs[1][0, m:m + 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g2, outs[2][0, m + 1:m + 2], atol=1e-5, rtol=1e-5)
        # negative control: depth 1 fed the target's own feature instead of its prediction differs
        wrong = head(f, e, depth=1)[0]
        assert not torch.allclose(wrong[0, 3:], outs[1][0, 3:], atol=1e-3)


def test_a_new_head_reading_more_layers_starts_as_the_plain_head():
    """The layer mix starts as the pick of the last layer, so training starts where the plain head is."""
    torch.manual_seed(0)
    plain = FeatureHead(32, 48, n_heads=4, n_kv=2, head_dim=8).eval()
    wide = FeatureHead(32, 48, n_heads=4, n_kv=2, head_dim=8, feature_layers=(0, 2, 5)).eval()
    wide.load_state_dict(plain.state_dict(), strict=False)
    f, e = torch.randn(1, 6, 3 * 32), torch.randn(1, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(wide(f, e, depth=2)[1], plain(f[..., -32:], e, depth=2)[1])
        assert not torch.allclose(wide(f, e)[0], plain(f[..., :32], e)[0])  # negative control: not the first layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tree,layers", [(False, None), (True, None), (False, (0, 1)), (True, (0, 1))])
def test_drafter_cache_across_steps_equals_a_fresh_one(tiny_target, tokenizer, tree, layers, device):
    tiny_target = on(tiny_target, device)
    drafter = random_head_drafter(tiny_target, layers=layers)
    dec = SpeculativeDecoder(tiny_target, tokenizer, drafter)
    cfg = GenerationConfig(max_new_tokens=40, policy="fixed", draft_len=3, ignore_eos=True, tree=tree)
    result = dec.generate("Once upon a time", cfg)
    assert result.stats.drafted > 0 and result.stats.accepted < result.stats.drafted  # rejections happened
    plain = SpeculativeDecoder(tiny_target, tokenizer, NoDrafter()).generate("Once upon a time", cfg)
    assert result.token_ids == plain.token_ids  # greedy output is the target's
    context = result.prompt_token_ids + result.token_ids
    gen = torch.Generator()
    kept = drafter.propose(context, DraftPlan(4), cfg, gen)
    fresh = random_head_drafter(tiny_target, layers=layers)
    fresh.attach(dec.target)
    again = fresh.propose(context, DraftPlan(4), cfg, gen)
    assert kept.tokens == again.tokens and kept.parents == again.parents
    assert drafter.propose(context, DraftPlan(4), cfg, gen).tokens == kept.tokens  # the same context twice
    assert kept.confidence == pytest.approx(again.confidence, abs=1e-5)


def test_head_needs_the_lean_runner(tiny_target):
    from specdecode.config import ConfigError

    drafter = random_head_drafter(tiny_target)
    with pytest.raises(ConfigError, match="draft"):
        drafter.attach(make_runner(tiny_target, tiny_target.config.vocab_size, fast=False))


def test_output_rows_give_the_same_logits_one_row_or_many(tiny_target):
    """Several rows at once (a tree's frontier) take the other product layout on a CPU; the logits
    are those of each row alone, and of the training path's batched form."""
    parts = TargetParts(tiny_target, torch.tensor([3, 1, 4, 15, 9, 26]))
    g = torch.randn(4, tiny_target.config.hidden_size)
    many = parts.logits(g)
    assert many.shape == (4, 6) and many.is_contiguous()
    rows = torch.cat([parts.logits(g[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(many, rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.logits(g[None])[0], rows, atol=1e-5, rtol=1e-5)
    full = (
        torch.nn.functional.rms_norm(g, (g.shape[-1],), parts.norm, parts.eps)
        @ tiny_target.get_output_embeddings().weight.detach().t()
    )
    torch.testing.assert_close(many, full[:, [3, 1, 4, 15, 9, 26]], atol=1e-5, rtol=1e-5)  # the rows asked for
