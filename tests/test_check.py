"""check passes the correct engine and fails on planted faults."""

import torch

from specdecode import GenerationConfig
from specdecode import engine as engine_mod
from specdecode.check import run_check
from specdecode.drafters.model import ModelDrafter
from specdecode.engine import SpeculativeDecoder
from specdecode.sampling import logits_to_probs
from specdecode.verify import Verdict, verify

from conftest import PROMPTS

SAMPLING = GenerationConfig(temperature=1.0, top_p=0.8, draft_len=2, policy="fixed")
GREEDY = GenerationConfig(max_new_tokens=24, draft_len=4, policy="fixed", ignore_eos=True)


def make(tiny_target, tiny_draft, tokenizer, drafter_cls=ModelDrafter):
    return SpeculativeDecoder(tiny_target, tokenizer, drafter_cls(tiny_draft, vocab_size=len(tokenizer)))


def sampling_check(dec):
    return run_check(dec, SAMPLING, PROMPTS[:1], draws=400, alpha=1e-3, progress=False)


def test_correct_engine_passes(tiny_target, tiny_draft, tokenizer):
    dec = make(tiny_target, tiny_draft, tokenizer)
    assert run_check(dec, GREEDY, PROMPTS, progress=False)["passed"]
    report = sampling_check(dec)
    assert report["passed"], report
    assert report["contexts"][0]["accepted"] > 0


class WrongDistribution(ModelDrafter):
    """Reports a distribution other than the one it sampled from (no top-p on the reported one)."""

    def propose(self, context, plan, config, generator):
        draft = super().propose(context, plan, config, generator)
        if draft.probs is not None:
            draft.probs = torch.softmax(torch.log(draft.probs.clamp_min(1e-30)) * 0.3, -1)
        return draft


def test_fails_when_draft_distribution_is_not_the_sampled_one(tiny_target, tiny_draft, tokenizer):
    assert not sampling_check(make(tiny_target, tiny_draft, tokenizer, WrongDistribution))["passed"]


def test_fails_when_top_p_is_applied_to_one_side_only(tiny_target, tiny_draft, tokenizer, monkeypatch):
    monkeypatch.setattr(engine_mod, "logits_to_probs", lambda logits, t, k, p: logits_to_probs(logits, t, k, 1.0))
    assert not sampling_check(make(tiny_target, tiny_draft, tokenizer))["passed"]


def test_fails_on_wrong_bonus_token(tiny_target, tiny_draft, tokenizer, monkeypatch):
    def wrong_bonus(tokens, draft_probs, target_probs, gen):
        v = verify(tokens, draft_probs, target_probs, gen)
        if v.num_accepted == len(tokens) and tokens:  # bonus drawn from the position before
            return Verdict(v.num_accepted, v.tokens[:-1] + [int(target_probs[len(tokens) - 1].argmax())])
        return v

    monkeypatch.setattr(engine_mod, "verify", wrong_bonus)
    dec = SpeculativeDecoder(tiny_target, tokenizer, ModelDrafter(tiny_target, vocab_size=len(tokenizer)))
    assert not run_check(dec, GREEDY, PROMPTS, progress=False)["passed"]


def test_fails_on_cache_rollback_off_by_one(tiny_target, tiny_draft, tokenizer):
    dec = make(tiny_target, tiny_draft, tokenizer)
    original = dec.target.truncate
    dec.target.truncate = lambda n: original(n + 1)  # keeps one rejected token's keys/values
    report = run_check(dec, GREEDY, PROMPTS, progress=False)
    assert not report["passed"]
    assert any(c["verdict"] == "wrong output" for c in report["cases"])
