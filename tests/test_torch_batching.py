"""Continuous batching on the torch backend (``runners.torch_batch``): a pass over several slots
scores each block as the slot's own runner would, trees beside chains; each request in a batch
gets the tokens it gets alone (greedy, and seeded sampling through the coupled rule, with any
drafter); a kept branch leaves the cache of a fresh prefill."""

from __future__ import annotations

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.batching import BatchEngine
from specdecode.batching.budget import PassCost
from specdecode.config import ConfigError
from specdecode.drafters.base import Draft, NoDrafter
from specdecode.drafters.ngram import HybridDrafter, NgramDrafter
from specdecode.engine import SpeculativeDecoder
from specdecode.runners import LeanLlama, LeanRunner
from specdecode.runners.base import Block
from specdecode.runners.torch_batch import TorchBatchRunner
from specdecode.verify import verify_coupled, verify_tree_coupled

from conftest import PROMPTS, random_head_drafter

PROMPTS = PROMPTS + ["Once upon a time there was a lighthouse keeper", "apple, banana, apple, banana, apple,"]
# pending token 7; under it 11 and 12; under 11: 13; under 12: 14 and 15
TREE = [7, 11, 12, 13, 14, 15]
PARENTS = [-1, 0, 0, 1, 2, 2]
COST = PassCost(fixed_s=0.010, per_token_s=0.002)  # a fixed cost not measured: tests stay quick


def _drafter(kind, model):
    if kind == "none":
        return NoDrafter()
    if kind == "ngram":
        return NgramDrafter()
    head = random_head_drafter(model)
    return head if kind == "head" else HybridDrafter(head)


def _engine(decoder, slots):
    runner = BatchEngine.for_decoder(decoder, slots, 256).runner
    return BatchEngine(runner, decoder.tokenizer, decoder.eos_ids, decoder.drafter.spawn, 256, COST)


def _run(engine, prompts, configs, cancel_after=None):
    seqs = {engine.add(p, c).id: i for i, (p, c) in enumerate(zip(prompts, configs))}
    out = {i: [] for i in range(len(prompts))}
    trees = steps = 0
    while engine.running:
        for seq, event in engine.step():
            out[seqs[seq.id]] += event.token_ids
            trees += event.step.depth is not None
        steps += 1
        for seq in list(engine.running.values()):
            if cancel_after and cancel_after.get(seqs[seq.id]) == steps:
                engine.cancel(seq)
    return [out[i] for i in range(len(prompts))], trees


def test_a_batch_pass_scores_each_block_as_the_slots_own_runner(tiny_target):
    model = LeanLlama(tiny_target, tune=False)
    batch = TorchBatchRunner(model, 3, 64)
    context = list(range(100, 120))
    batch.forward([Block(0, context[:7], 0), Block(2, context, 0)])
    got = batch.forward([Block(0, [5, 6, 9], 3), Block(1, [40, 41], 1), Block(2, TREE, len(TREE), PARENTS)])
    for slot, prefix, block in [(0, context[:7], ([5, 6, 9], 3)), (1, [], ([40, 41], 1)), (2, context, None)]:
        alone = LeanRunner(model)
        if prefix:
            alone.forward(prefix, num_logits=0)
        want = alone.forward_tree(TREE, PARENTS) if block is None else alone.forward(*block)
        torch.testing.assert_close(got[slot], want, atol=1e-5, rtol=1e-5)
    assert batch.cached[1] == [40, 41] and batch.cached[2] == context + TREE


def test_a_kept_branch_leaves_the_cache_of_a_fresh_prefill(tiny_target):
    model = LeanLlama(tiny_target, tune=False)
    batch = TorchBatchRunner(model, 2, 64)
    context = list(range(100, 120))
    batch.forward([Block(0, context, 0), Block(1, context[:5], 0)])
    batch.forward([Block(0, TREE, len(TREE), PARENTS), Block(1, [3, 4], 2)])
    batch.keep_branch(0, len(context), [0, 2, 4])  # 7 -> 12 -> 14
    batch.truncate(1, 6)
    fresh = LeanRunner(model)
    fresh.forward(context + [7, 12, 14], num_logits=0)
    assert batch.cached[0] == fresh.cached
    for (k, v), (k2, v2) in zip(batch.slot_runner(0).cache_tensors(), fresh.cache_tensors()):
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=1e-5)
    # negative control: cut back as a chain instead, the cache holds 7, 11, 12 at tree positions
    chain = TorchBatchRunner(model, 1, 64)
    chain.forward([Block(0, context, 0)])
    chain.forward([Block(0, TREE, len(TREE), PARENTS)])
    chain.truncate(0, len(context) + 3)
    assert not torch.allclose(chain.slot_runner(0).cache_tensors()[0][0], fresh.cache_tensors()[0][0], atol=1e-3)
    assert batch.cached[1] == context[:5] + [3]


@pytest.mark.parametrize("kind", ["none", "ngram", "head", "head+ngram"])
def test_every_request_in_a_batch_gets_the_tokens_it_gets_alone(tiny_target, tokenizer, kind):
    decoder = SpeculativeDecoder(tiny_target, tokenizer, _drafter(kind, tiny_target))
    plain = SpeculativeDecoder(tiny_target, tokenizer, NoDrafter())
    prompts = [plain.encode(p, chat=False) for p in PROMPTS]
    # ragged: one request stops after 5 tokens; whole trees (policy fixed) beside budgeted chains
    configs = [GenerationConfig(max_new_tokens=5 if i == 1 else 30, ignore_eos=True, tree=i % 2 == 0,
                                policy="fixed" if i % 2 == 0 else "cost", draft_len=3)
               for i in range(len(prompts))]
    want = [plain.generate(p, c.with_(tree=False, policy="cost")).token_ids for p, c in zip(prompts, configs)]
    got, trees = _run(_engine(decoder, 4), prompts, configs)
    assert got == want
    if kind.startswith("head"):
        assert trees > 0  # trees were sent, beside chains


def test_a_cancelled_request_leaves_the_others_unchanged(tiny_target, tokenizer):
    decoder = SpeculativeDecoder(tiny_target, tokenizer, _drafter("head", tiny_target))
    plain = SpeculativeDecoder(tiny_target, tokenizer, NoDrafter())
    prompts = [plain.encode(p, chat=False) for p in PROMPTS[:3]]
    configs = [GenerationConfig(max_new_tokens=20, ignore_eos=True)] * 3
    want = [plain.generate(p, c).token_ids for p, c in zip(prompts, configs)]
    engine = _engine(decoder, 3)
    got, _ = _run(engine, prompts, configs, cancel_after={0: 2})
    assert got[1:] == want[1:] and got[0] == want[0][: len(got[0])] and len(got[0]) < 20
    assert engine.free_slots == 3


def test_a_reused_slot_prefix_gives_the_head_the_features_of_a_fresh_prefill(tiny_target, tokenizer):
    decoder = SpeculativeDecoder(tiny_target, tokenizer, _drafter("head", tiny_target))
    first = decoder.encode(PROMPTS[0], chat=False)
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, policy="fixed", draft_len=3)
    engine = _engine(decoder, 2)
    (answer,), _ = _run(engine, [first], [config])
    follow = first + answer + decoder.encode(PROMPTS[1], chat=False)

    def drafts(engine):  # what the head proposed at each step, from the slot's features
        seq = engine.add(follow, config)
        held, out, propose = seq.read, [], seq.drafter.propose

        def recorded(*args):
            draft = propose(*args)
            out.append(draft.tokens)
            return draft

        seq.drafter.propose = recorded
        while engine.running:
            engine.step()
        return held, out

    held, reused = drafts(engine)
    fresh_held, fresh = drafts(_engine(decoder, 2))
    assert held >= len(first) + len(answer) - 1 and fresh_held == 0
    assert reused == fresh and len(fresh) > 3


def test_seeded_sampling_gives_the_same_tokens_alone_and_batched_with_any_drafter(tiny_target, tokenizer):
    plain = SpeculativeDecoder(tiny_target, tokenizer, NoDrafter())
    prompts = [plain.encode(p, chat=False) for p in PROMPTS]
    sampled = GenerationConfig(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone, _ = _run(_engine(plain, 1), prompts[1:2], [sampled])
    for kind in ("ngram", "head", "head+ngram"):
        decoder = SpeculativeDecoder(tiny_target, tokenizer, _drafter(kind, tiny_target))
        # the head drafts sampled chains (tree auto) and, forced, trees under sampling
        configs = [(sampled.with_(tree=True, policy="fixed", draft_len=3) if kind == "head" else sampled) if i == 1
                   else GenerationConfig(max_new_tokens=16 + i, temperature=0.7, seed=i, tree=i % 2 == 0,
                                         policy="fixed" if i % 2 == 0 else "cost", draft_len=3)
                   for i in range(len(prompts))]
        got, _ = _run(_engine(decoder, 4), prompts, configs)
        assert got[1] == alone[0], kind
    other, _ = _run(_engine(plain, 1), prompts[1:2], [sampled.with_(seed=99)])
    assert other != alone  # the seed matters: the test could fail


def test_the_coupled_tree_rule_follows_the_targets_token_at_each_depth():
    vocab, nodes, parents = 20, TREE[1:], [p - 1 for p in PARENTS[1:]]  # the drafted nodes under pending 7
    probs = torch.full((len(nodes) + 1, vocab), 0.01)
    # the target's tokens: 12 after the pending token, then 15, then 3 (no such node: it ends there)
    for row, token in [(0, 12), (2, 15), (5, 3)]:
        probs[row, token] = 1.0
    probs /= probs.sum(-1, keepdim=True)
    branch, verdict = verify_tree_coupled(nodes, parents, probs, None)
    assert branch == [1, 4] and verdict.tokens == [12, 15, 3] and verdict.num_accepted == 2
    # sampled: the token at each depth is the Gumbel-max one under that depth's noise
    noise = torch.zeros(3, vocab)
    noise[1, 14] = 100.0  # at depth 1 the noise picks 14 whatever the target prefers
    branch, verdict = verify_tree_coupled(nodes, parents, probs, noise)
    assert branch == [1, 3] and verdict.tokens[:2] == [12, 14]
    # a chain through the tree rule is the chain rule
    chain, rows = [12, 15, 9], probs[[0, 2, 5, 0]]
    assert verify_coupled(chain, rows, None) == verify_tree_coupled(chain, [-1, 0, 1], rows, None)[1]


def test_a_pruned_tree_keeps_the_likeliest_candidates_as_a_tree():
    draft = Draft(TREE[1:], None, [0.6, 0.3, 0.9, 0.5, 0.4], parents=[-1, -1, 0, 1, 1])
    # path scores 0.6, 0.3, 0.54, 0.15, 0.12: the best three are nodes 0, 2 and 1
    pruned = draft.prune(3)
    assert pruned.tokens == [11, 12, 13] and pruned.parents == [-1, -1, 0]
    assert draft.prune(1).tokens == [11] and draft.prune(9) is draft


def test_batching_refuses_a_drafter_it_cannot_copy(tiny_target, tiny_draft, tokenizer):
    from specdecode.drafters.model import ModelDrafter

    decoder = SpeculativeDecoder(tiny_target, tokenizer, ModelDrafter(tiny_draft, tokenizer.vocab_size))
    with pytest.raises(ConfigError) as err:
        BatchEngine.for_decoder(decoder, 4)
    assert err.value.param == "max_batch" and "--max-batch 1" in str(err.value)


def test_the_head_drafts_only_while_its_drafting_time_pays(tiny_target, tokenizer):
    decoder = SpeculativeDecoder(tiny_target, tokenizer, _drafter("head", tiny_target))
    prompts = [decoder.encode(p, chat=False) for p in PROMPTS[:2]]
    rooms = {}
    for per_token in (0.0, 1.0):  # seconds a head step is taken to cost per drafted token
        engine = _engine(decoder, 2)
        for p in prompts:
            engine.add(p, GenerationConfig(max_new_tokens=12, ignore_eos=True))
        engine.step()  # reads the prompts: both requests now decode
        engine.planner.draft_s_per_token = per_token
        rooms[per_token] = engine.planner._draft_rooms(list(engine.running.values()))
    assert all(n > 0 for n in rooms[0.0].values()) and all(n == 0 for n in rooms[1.0].values())
