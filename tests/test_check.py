"""check passes the correct engine and fails on planted faults."""

from specdecode import GenerationConfig
from specdecode import sampling as sampling_mod
from specdecode import step as step_mod
from specdecode.check import run_check
from specdecode.drafters.model import ModelDrafter
from specdecode.engine import SpeculativeDecoder
from specdecode.sampling import logits_to_probs, position_noise
from specdecode.verify import Verdict, verify_tree_coupled

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


def test_fails_when_the_noise_is_not_standard_gumbel(tiny_target, tiny_draft, tokenizer, monkeypatch):
    """Halved noise draws from the target's distribution squared (renormalised), not from it."""
    monkeypatch.setattr(sampling_mod, "position_noise", lambda seed, at, vocab: 0.5 * position_noise(seed, at, vocab))
    assert not sampling_check(make(tiny_target, tiny_draft, tokenizer))["passed"]


def test_fails_when_top_p_is_left_out_of_the_targets_distribution(tiny_target, tiny_draft, tokenizer, monkeypatch):
    monkeypatch.setattr(step_mod, "logits_to_probs", lambda logits, t, k, p: logits_to_probs(logits, t, k, 1.0))
    assert not sampling_check(make(tiny_target, tiny_draft, tokenizer))["passed"]


def test_fails_on_wrong_bonus_token(tiny_target, tiny_draft, tokenizer, monkeypatch):
    def wrong_bonus(tokens, parents, target_probs, noise):
        branch, v = verify_tree_coupled(tokens, parents, target_probs, noise)
        if v.num_accepted == len(tokens) and tokens:  # bonus taken from the position before
            return branch, Verdict(v.num_accepted, v.tokens[:-1] + [int(target_probs[len(tokens) - 1].argmax())])
        return branch, v

    monkeypatch.setattr(step_mod, "verify_tree_coupled", wrong_bonus)
    dec = SpeculativeDecoder(tiny_target, tokenizer, ModelDrafter(tiny_target, vocab_size=len(tokenizer)))
    assert not run_check(dec, GREEDY, PROMPTS, progress=False)["passed"]


def test_fails_on_cache_rollback_off_by_one(tiny_target, tiny_draft, tokenizer):
    dec = make(tiny_target, tiny_draft, tokenizer)
    original = dec.target.truncate
    dec.target.truncate = lambda n: original(n + 1)  # keeps one rejected token's keys/values
    report = run_check(dec, GREEDY, PROMPTS, progress=False)
    assert not report["passed"]
    assert any(c["verdict"] == "wrong output" for c in report["cases"])


def test_a_sampling_check_that_accepted_too_few_drafts_is_inconclusive_not_passed(monkeypatch, capsys):
    """A run whose drafts were never accepted tested the acceptance rule too little to vouch for it."""
    from specdecode import check
    from specdecode.cli import check as check_cli

    unexercised = {"prompt": "p", "first_token": {"passed": True, "draws": 1000, "chi2": 1.0, "dof": 3,
                   "p_value": 0.5, "alpha": 0.01, "tv_distance": 0.01}, "second_token_after_mode": None,
                   "drafted": 315, "accepted": 0, "passed": True}
    monkeypatch.setattr(check, "check_sampling", lambda *args, **kw: [unexercised])
    report = run_check(None, SAMPLING, ["p"], progress=False)
    assert report["inconclusive"] and not report["passed"]
    assert check.format_report(report, None).splitlines()[-1].startswith("INCONCLUSIVE: drafts were accepted 0 times")
    monkeypatch.setattr(check, "check_sampling", lambda *args, **kw: [{**unexercised, "accepted": check.MIN_ACCEPTED}])
    assert run_check(None, SAMPLING, ["p"], progress=False)["passed"]
    assert check_cli.INCONCLUSIVE not in (0, 1, 2)
