"""The decoding loop: greedy output identical to plain decoding, caches equal to a fresh prefill,
stop conditions inside accepted blocks, reproducible sampling."""

from __future__ import annotations

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.costmodel import CostModel
from specdecode.drafters.base import Draft, Drafter, DraftPlan, NoDrafter
from specdecode.drafters.model import ModelDrafter
from specdecode.drafters.ngram import NgramDrafter
from specdecode.engine import SpeculativeDecoder
from specdecode.runners import HFRunner

from conftest import PROMPTS, decoder, plain


@pytest.mark.parametrize("tau", range(1, 9))
@pytest.mark.parametrize("kind", ["model", "ngram"])
def test_greedy_identical_to_plain_decoding_tiny(tiny_target, tiny_draft, tokenizer, tau, kind):
    drafter = ModelDrafter(tiny_draft, vocab_size=len(tokenizer)) if kind == "model" else NgramDrafter()
    dec = decoder(tiny_target, tokenizer, drafter)
    total_accepted = 0
    for prompt in PROMPTS:
        want = plain(tiny_target, tokenizer, prompt)
        got = dec.generate(
            prompt, GenerationConfig(max_new_tokens=40, draft_len=tau, policy="fixed", ignore_eos=True), chat=False
        )
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        total_accepted += got.stats.accepted
    assert total_accepted > 0  # otherwise the comparison would not exercise acceptance


def test_draft_equal_to_target_accepts_everything_and_stays_in_sync(tiny_target, tokenizer):
    dec = decoder(tiny_target, tokenizer, ModelDrafter(tiny_target, vocab_size=len(tokenizer)))
    got = dec.generate(
        PROMPTS[0], GenerationConfig(max_new_tokens=33, draft_len=4, policy="fixed", ignore_eos=True), chat=False
    )
    assert got.token_ids == plain(tiny_target, tokenizer, PROMPTS[0], n=33).token_ids
    assert got.stats.acceptance_rate == 1.0
    assert got.stats.mean_accepted_length == pytest.approx(33 / got.stats.steps)


def _fresh_cache(model, ids):
    fresh = HFRunner(model)
    fresh.forward(ids, num_logits=0)
    return fresh.cache_tensors()


def _assert_caches_equal(a, b):
    assert len(a) == len(b) > 0
    for (ka, va), (kb, vb) in zip(a, b):
        assert ka.shape == kb.shape
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-4)


def test_caches_equal_fresh_prefill_after_partial_acceptance(tiny_target, tiny_draft, tokenizer):
    drafter = ModelDrafter(tiny_draft, vocab_size=len(tokenizer))
    dec = decoder(tiny_target, tokenizer, drafter)
    prompt_ids = dec.encode(PROMPTS[0], chat=False)
    context = list(prompt_ids)
    partial = 0
    for event in dec.stream(
        prompt_ids, GenerationConfig(max_new_tokens=30, draft_len=5, policy="fixed", ignore_eos=True)
    ):
        context.extend(event.token_ids)
        rec = event.step
        partial += 0 < rec.accepted < rec.drafted
        # target: everything but the pending (last) token, exactly as a fresh prefill computes it
        assert dec.target.cached == context[:-1]
        _assert_caches_equal(dec.target.cache_tensors(), _fresh_cache(tiny_target, context[:-1]))
        # draft: whatever it kept must be a prefix of the context and equal to a fresh prefill of it
        kept = drafter.runner.sync(context[:-1])
        assert drafter.runner.cached == context[:kept]
        if kept:
            _assert_caches_equal(drafter.runner.cache_tensors(), _fresh_cache(tiny_draft, context[:kept]))
    assert partial > 0  # some step accepted k of tau with 0 < k < tau


class OracleDrafter(Drafter):
    """Proposes the target's own greedy continuation: every token is accepted."""

    name = "oracle"

    def __init__(self, continuation: list[int], prompt_len: int):
        self.continuation, self.prompt_len = continuation, prompt_len

    def propose(self, context, plan, config, generator):
        done = len(context) - self.prompt_len
        return Draft(self.continuation[done : done + plan.max_tokens])


def _oracle_decoder(model, tokenizer, prompt, n=30):
    want = plain(model, tokenizer, prompt, n=n)
    dec = decoder(model, tokenizer, OracleDrafter(want.token_ids, len(want.prompt_token_ids)))
    return dec, want


def test_eos_inside_accepted_block_ends_generation_there(tiny_target, tokenizer):
    dec, want = _oracle_decoder(tiny_target, tokenizer, PROMPTS[1])
    eos_at = 6
    eos = want.token_ids[eos_at]
    first = want.token_ids.index(eos)
    dec.eos_ids = {eos}
    got = dec.generate(PROMPTS[1], GenerationConfig(max_new_tokens=30, draft_len=8, policy="fixed"), chat=False)
    assert got.token_ids == want.token_ids[: first + 1]
    assert got.finish_reason == "stop"
    assert got.stats.new_tokens == first + 1


def test_max_new_tokens_reached_mid_block(tiny_target, tokenizer):
    dec, want = _oracle_decoder(tiny_target, tokenizer, PROMPTS[0])
    for n in (1, 5, 9):
        got = dec.generate(
            PROMPTS[0], GenerationConfig(max_new_tokens=n, draft_len=8, policy="fixed", ignore_eos=True), chat=False
        )
        assert got.token_ids == want.token_ids[:n]
        assert got.finish_reason == "length"


def test_stop_string_spanning_tokens_in_one_block(tiny_target, tokenizer):
    dec, want = _oracle_decoder(tiny_target, tokenizer, PROMPTS[0])
    # a stop string made of the tail of token 4 and the head of token 5
    piece4 = tokenizer.decode(want.token_ids[4:5])
    piece5 = tokenizer.decode(want.token_ids[5:6])
    assert piece4 and piece5
    stop = piece4[-2:] + piece5[:2]
    full = tokenizer.decode(want.token_ids, skip_special_tokens=True)
    cfg = GenerationConfig(max_new_tokens=30, draft_len=8, policy="fixed", ignore_eos=True, stop=(stop,))
    streamed = [e.text for e in dec.stream(PROMPTS[0], cfg, chat=False)]
    got = dec.generate(PROMPTS[0], cfg, chat=False)
    assert got.finish_reason == "stop"
    assert got.text == full[: full.index(stop)]
    assert "".join(streamed) == got.text
    assert got.token_ids == want.token_ids[:6]  # up to the token that completed the stop string
    assert got.stats.steps == 1  # all of it happened inside one accepted block


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_target, tiny_draft, tokenizer):
    dec = decoder(tiny_target, tokenizer, ModelDrafter(tiny_draft, vocab_size=len(tokenizer)))
    cfg = GenerationConfig(
        max_new_tokens=30, temperature=0.8, top_p=0.9, top_k=50, seed=123, ignore_eos=True, policy="fixed", draft_len=4
    )
    a = dec.generate(PROMPTS[0], cfg, chat=False).token_ids
    b = dec.generate(PROMPTS[0], cfg, chat=False).token_ids
    c = dec.generate(PROMPTS[0], cfg.with_(seed=124), chat=False).token_ids
    assert a == b
    assert a != c


@pytest.mark.parametrize("tau", [1, 3, 6])
def test_seeded_sampling_emits_what_plain_seeded_decoding_emits_whatever_is_drafted(tiny_target, tiny_draft,
                                                                                    tokenizer, tau):
    """The one rule of both loops (``step.settle``): a seeded request's tokens are those of plain
    decoding with its seed, whatever the drafter and the draft length."""
    cfg = GenerationConfig(max_new_tokens=30, temperature=0.9, top_k=40, seed=5, ignore_eos=True, policy="fixed",
                           draft_len=tau)
    want = decoder(tiny_target, tokenizer, NoDrafter()).generate(PROMPTS[0], cfg, chat=False).token_ids
    for drafter in (ModelDrafter(tiny_draft, vocab_size=len(tokenizer)), NgramDrafter()):
        got = decoder(tiny_target, tokenizer, drafter).generate(PROMPTS[0], cfg, chat=False)
        assert got.token_ids == want
    assert got.stats.drafted > 0


def test_a_sampling_drafter_drawing_with_the_targets_noise_proposes_the_targets_tokens(tiny_target, tokenizer,
                                                                                       monkeypatch):
    """A draft model equal to the target, sampling, draws each token with the noise the target's
    token at that position is drawn with (``DraftPlan.noise``): every drafted token is accepted.
    Negative control: drawing from its own generator instead, it is accepted only by chance."""
    from specdecode.batching import plan as planning

    dec = decoder(tiny_target, tokenizer, ModelDrafter(tiny_target, vocab_size=len(tokenizer)))
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True, policy="fixed", draft_len=4)
    coupled = dec.generate(PROMPTS[0], cfg, chat=False)
    assert coupled.stats.acceptance_rate == 1.0
    monkeypatch.setattr(planning, "with_noise", lambda plan, noise, at: plan)
    independent = dec.generate(PROMPTS[0], cfg, chat=False)
    assert independent.token_ids == coupled.token_ids
    assert independent.stats.acceptance_rate < 0.9


def test_streaming_text_equals_result_text(tiny_target, tiny_draft, tokenizer):
    dec = decoder(tiny_target, tokenizer, NgramDrafter())
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    events = list(dec.stream(PROMPTS[1], cfg, chat=False))
    assert "".join(e.text for e in events) == dec.generate(PROMPTS[1], cfg, chat=False).text
    assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])


def test_cost_policy_turns_speculation_off_when_drafts_fail(tiny_target, tokenizer):
    class WrongDrafter(Drafter):
        name = "wrong"

        def propose(self, context, plan, config, generator):
            return Draft([0] * plan.max_tokens)  # token 0 is never the argmax of the sharpened model

    # a fixed cost curve (smoothing 0: timings observed on this machine do not move it), shaped
    # like the default target's on a CPU: a pass over 2+ tokens costs 1.6x a 1-token pass
    cost = CostModel(target_s={n: 0.05 if n == 1 else 0.08 for n in range(1, 18)}, smoothing=0.0)
    dec = SpeculativeDecoder(tiny_target, tokenizer, WrongDrafter(), cost=cost)
    got = dec.generate(PROMPTS[0], GenerationConfig(max_new_tokens=60, ignore_eos=True), chat=False)
    assert got.token_ids == plain(tiny_target, tokenizer, PROMPTS[0], n=60).token_ids
    assert got.stats.accepted == 0
    # one failed block of 8 turns it off; then only a probe of 2 every 16 plain steps
    assert got.stats.drafted <= 8 + 2 * (60 // 16 + 1)
    assert got.stats.drafted_at[0] <= 1 + 60 // 16 + 1


def test_cost_policy_judges_unsent_drafts_instead_of_probing(tiny_target, tokenizer):
    """A drafter whose unsent drafts the engine judges (one-hot, nearly free) needs no probe
    passes: while speculation is off its drafts are scored against the tokens then emitted, and
    speculation comes back when they start to match."""
    want = plain(tiny_target, tokenizer, PROMPTS[0], n=60).token_ids
    prompt = len(decoder(tiny_target, tokenizer, NoDrafter()).encode(PROMPTS[0], chat=False))

    class LateDrafter(Drafter):
        name = "late"
        judged_unsent = True

        def propose(self, context, plan, config, generator):
            at = len(context) - prompt  # tokens emitted so far
            if at < 24:
                return Draft([0] * plan.max_tokens)  # wrong while the first 24 tokens come out
            return Draft(want[at:at + plan.max_tokens])  # then exactly the target's continuation

    cost = CostModel(target_s={n: 0.05 if n == 1 else 0.08 for n in range(1, 18)}, smoothing=0.0)
    dec = SpeculativeDecoder(tiny_target, tokenizer, LateDrafter(), cost=cost)
    emitted, sent_while_wrong, tokens = 0, 0, []
    for event in dec.stream(PROMPTS[0], GenerationConfig(max_new_tokens=60, ignore_eos=True), chat=False):
        if emitted < 24:
            sent_while_wrong += event.step.drafted
        emitted += len(event.token_ids)
        tokens += event.token_ids
    assert tokens == want
    assert sent_while_wrong == 8  # the first block of 8 failed; no probe blocks after it
    assert event.stats.accepted >= 8  # back on once the unsent drafts matched


def test_seeded_sampling_does_not_depend_on_measured_costs(tiny_target, tiny_draft, tokenizer):
    """The cost policy plans from timings; seeded sampling must give the same output anyway."""
    dec = decoder(tiny_target, tokenizer, ModelDrafter(tiny_draft, vocab_size=len(tokenizer)))
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, seed=9, ignore_eos=True, policy="cost")
    first = dec.generate(PROMPTS[1], cfg, chat=False).token_ids
    # pretend the machine got much slower at long passes: live timings would now pick other taus
    slower = CostModel(target_s={n: 0.01 * n for n in range(1, 20)}, draft_token_s=0.02, smoothing=0.0)
    dec = SpeculativeDecoder(tiny_target, tokenizer, dec.drafter, cost=slower)
    assert dec.generate(PROMPTS[1], cfg, chat=False).token_ids == first


def test_dynamic_draft_ends_block_where_confidence_product_falls_below_floor(tiny_target, tiny_draft, tokenizer):
    drafter = ModelDrafter(tiny_draft, vocab_size=len(tokenizer))
    ctx = tokenizer("The cat sat on the mat and the cat").input_ids
    cfg = GenerationConfig(max_new_tokens=40)
    full = drafter.propose(ctx, DraftPlan(8), cfg, torch.Generator())
    assert len(full) == 8  # floor 0: the whole block
    products = torch.tensor(full.confidence).cumprod(0).tolist()
    floor = (products[1] + products[2]) / 2  # between the 2nd and 3rd token's products
    assert products[2] < floor <= products[1]
    drafter.reset()
    cut = drafter.propose(ctx, DraftPlan(8, path_floor=floor), cfg, torch.Generator())
    assert cut.tokens == full.tokens[:3]  # the token that crosses the floor is kept, no further one


def test_cost_policy_with_dynamic_drafter_offers_full_block_and_break_even_floor(tiny_target, tiny_draft, tokenizer):
    from specdecode.policy import make_policy

    cost = CostModel(target_s={n: 0.05 + 0.004 * (n - 1) for n in range(1, 18)}, draft_token_s=0.005, smoothing=0.0)
    static = make_policy("cost", 8, cost)
    dynamic = make_policy("cost", 8, cost, dynamic=True)
    (tau, speedup), (static_tau, _) = dynamic.choose(), static.choose()
    assert tau == 8 and static_tau < 8 and speedup > 1.0
    assert static.path_floor(speedup) == 0.0
    # one more token pays while its chance exceeds rate x (draft + verification share) / T(1);
    # before anything is measured the drafter's confidence is taken at its word (bin edges of 0.1)
    needed = speedup * (0.005 + 0.004) / 0.05
    assert dynamic.path_floor(speedup) == pytest.approx(int(needed * 10) / 10)
    assert dynamic.plan(100).path_floor == dynamic.path_floor(speedup)  # what a step's plan carries
    # greedy output is still plain decoding's
    drafter = ModelDrafter(tiny_draft, vocab_size=len(tokenizer))
    dec = SpeculativeDecoder(tiny_target, tokenizer, drafter, cost=cost)
    for prompt in PROMPTS:
        got = dec.generate(prompt, GenerationConfig(max_new_tokens=40, ignore_eos=True), chat=False)
        assert got.token_ids == plain(tiny_target, tokenizer, prompt).token_ids
        assert got.stats.drafted > 0


def test_calibration_learns_an_overconfident_drafter_and_raises_the_floor():
    from specdecode.policy import Calibration

    cal = Calibration()
    assert cal.threshold(0.35) == pytest.approx(0.3)  # prior: confidence 0.3-0.4 is accepted ~35%
    for _ in range(200):  # a drafter that says 0.35 but is right a tenth of the time
        cal.observe([0.35], [False])
    for _ in range(20):
        cal.observe([0.35], [True])
    rates = cal.rates()
    # bins 1-3 pooled: the well-measured bin 3 outweighs the priors of 0.15 and 0.25 below it
    assert rates[3] == pytest.approx((20 + 4 * (0.15 + 0.25 + 0.35)) / (220 + 3 * 4), abs=1e-9)
    assert rates[1] == rates[3] and rates[0] == pytest.approx(0.05) and rates[4] == pytest.approx(0.45)
    assert rates == sorted(rates)  # monotone in confidence
    assert cal.threshold(0.35) == pytest.approx(0.4)  # the 0.3-0.4 bin no longer pays
    assert cal.threshold(2.0) > 1.0  # nothing reaches it: one token only
    # the product of confidences is what is binned: 0.9 then 0.5 -> 0.45 for the second token
    cal2 = Calibration(prior_weight=0.0001)
    cal2.observe(Draft([1, 2], confidence=[0.9, 0.5]).path_scores(), [True, False])
    assert cal2.tried[9] > 0.99 and cal2.passed[9] > 0.99 and cal2.tried[4] > 0.99 and cal2.passed[4] < 0.01


def test_cost_model_asks_for_a_plain_step_until_and_between_measurements_of_one_token():
    fresh = CostModel()
    assert fresh.baseline_stale()  # T(1) unknown: measure it before speculating
    fresh.observe_target(1, 0.04)
    assert not fresh.baseline_stale()
    for _ in range(fresh.refresh_every - 1):
        fresh.observe_target(4, 0.06)
    assert not fresh.baseline_stale()
    fresh.observe_target(4, 0.06)
    assert fresh.baseline_stale()  # refresh_every passes without a 1-token one
    assert not CostModel(target_s={1: 0.04, 4: 0.06}).baseline_stale()  # given (bench's calibration)


def test_cost_policy_measures_the_one_token_pass_before_and_while_speculating(tiny_target, tokenizer, tmp_path):
    """A draft that always agrees makes speculation pay at every step, so the plain steps in the
    run are the measurements of T(1): one before the first draft and one after each 32 passes."""
    from specdecode.trace import TraceWriter, read_trace

    class Flat(CostModel):  # plans as if passes were nearly flat, whatever this machine times
        def target(self, n):
            return 0.05 * (1 + 0.01 * (n - 1))

        def draft(self):
            return 0.0

    dec = SpeculativeDecoder(tiny_target, tokenizer, ModelDrafter(tiny_target, vocab_size=len(tokenizer)), cost=Flat())
    cfg = GenerationConfig(max_new_tokens=120, draft_len=2, ignore_eos=True)
    writer = TraceWriter(tmp_path / "t.jsonl")
    got = dec.generate(PROMPTS[0], cfg, chat=False, trace=writer)
    writer.close()
    assert got.token_ids == plain(tiny_target, tokenizer, PROMPTS[0], n=120).token_ids
    steps = [r for r in read_trace(tmp_path / "t.jsonl") if r["type"] == "step"]
    assert steps[0]["prompt_tokens"] > 0  # the pass that read the prompt gave the first token
    # the last step has room for one token only, so it is plain whatever the policy wants
    plain_at = [r["step"] for r in steps[1:-1] if r["draft_len"] == 0]
    assert plain_at == [1, 34]  # before the first draft, then after 32 speculative passes
    assert all(r["accepted"] == 2 for r in steps if r["draft_len"])
    assert 1 in dec.cost.target_s
    # the cost model is the decoder's, shared by its calls: no new measurement is due at the start
    second = dec.generate(PROMPTS[0], GenerationConfig(max_new_tokens=8, draft_len=2, ignore_eos=True), chat=False)
    assert second.stats.drafted_at[0] == second.stats.steps  # 3 + 3 + 2 tokens, all speculative


class _SureHead(Drafter):
    """A stand-in head: a tree of two roots whose best one has probability ``sure``."""

    name = "fake"

    def __init__(self, sure: float):
        self.sure, self.calls = sure, 0

    def propose(self, context, plan, config, generator) -> Draft:
        self.calls += 1
        return Draft([101, 102], confidence=[self.sure, self.sure / 2], parents=[-1, -1])


def test_hybrid_takes_a_short_match_where_it_has_been_right_more_often_than_the_head_is_sure():
    from specdecode.drafters.ngram import HybridDrafter

    cfg = GenerationConfig(max_new_tokens=8)
    unsure, sure = HybridDrafter(_SureHead(0.3)), HybridDrafter(_SureHead(0.7))
    ctx = [5, 6, 7, 9, 6]  # the longest match is 1 token (6), followed by 7 before
    assert unsure.match_rate(1) == 0.5  # the prior
    assert unsure.propose(ctx, DraftPlan(8), cfg, None).tokens == [7, 9, 6]  # 0.5 > 0.3: the match
    assert sure.propose(ctx, DraftPlan(8), cfg, None).tokens == [101, 102]  # 0.5 < 0.7: the head
    # the token that came next is scored against the match's, used or not
    for h in (unsure, sure):
        h.propose(ctx + [7], DraftPlan(8), cfg, None)
    assert unsure.match_rate(1) == sure.match_rate(1) == (1 + 1) / (1 + 2)
    miss = HybridDrafter(_SureHead(0.3))
    ctx2 = ctx
    for i in range(3):  # what follows 6 is never what followed it before: the rate falls below the head's 0.3
        miss.propose(ctx2, DraftPlan(8), cfg, None)
        ctx2 = ctx2 + [50 + i, 6]
    assert miss.propose(ctx2, DraftPlan(8), cfg, None).tokens == [101, 102] and miss.match_rate(1) == (0 + 1) / (3 + 2)
    miss.reset()
    assert miss.match_rate(1) == 0.5  # per request
    long = HybridDrafter(_SureHead(0.99))  # a 3-token match is taken whatever the head says, without asking it
    assert long.propose([1, 2, 3, 4, 1, 2, 3], DraftPlan(8), cfg, None).tokens == [4, 1, 2, 3] and long.head.calls == 0
    assert Draft([1, 2], confidence=[0.4, 0.2]).first_confidence() == 0.4  # a chain's first token
