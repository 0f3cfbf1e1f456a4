"""explain names the bottleneck of constructed traces, one per kind."""

import json

import pytest

from specdecode.cli import main
from specdecode.explain import analyse, load_steps

from conftest import assert_drawn


def step(i, tau, drafted, accepted, draft_s, verify_s, overhead_s=0.0005):
    return {"type": "step", "step": i, "draft_len": tau, "drafted": drafted, "accepted": accepted,
            "emitted": accepted + 1, "draft_s": draft_s, "verify_s": verify_s, "overhead_s": overhead_s,
            "target_tokens": drafted + 1}


T1 = 0.040


def trace(kind):
    steps = []
    for i in range(60):
        if kind == "policy_off":
            steps.append(step(i, 0, 0, 0, 0.0, T1) if i % 8 else step(i, 2, 2, 0, 0.0, T1 * 1.05))
        elif kind == "acceptance":  # cheap draft and verification, drafts rejected at position 1 or 2
            if i % 10 == 0:
                steps.append(step(i, 0, 0, 0, 0.0, T1))
            else:
                steps.append(step(i, 4, 4, int(i % 3 == 0), 0.0005, T1 * 1.05))
        elif kind == "draft_cost":  # good acceptance, but each drafted token costs 0.6 of a pass
            steps.append(step(i, 0, 0, 0, 0.0, T1) if i % 10 == 0 else step(i, 4, 4, 4, 4 * 0.6 * T1, T1 * 1.05))
        elif kind == "verification_cost":  # good acceptance, free draft, a 5-token pass costs 3x
            steps.append(step(i, 0, 0, 0, 0.0, T1) if i % 10 == 0 else step(i, 4, 4, 3, 0.0001, T1 * 3.0))
        elif kind == "overhead":
            steps.append(step(i, 0, 0, 0, 0.0, T1, 0.05) if i % 10 == 0 else step(i, 4, 4, 3, 0.0001, T1 * 1.05, 0.05))
    return steps


# the headline of the advice for each kind of bottleneck
HEADLINES = {
    "policy_off": "Bottleneck: speculation was off",
    "acceptance": "Bottleneck: acceptance too low",
    "draft_cost": "Bottleneck: the draft is too slow",
    "verification_cost": "Bottleneck: verification is expensive",
    "overhead": "Bottleneck: loop overhead",
}


@pytest.mark.parametrize("kind", list(HEADLINES))
def test_bottleneck_is_named(kind):
    report = analyse(trace(kind))
    assert report["bottleneck"] == kind
    named = [line for line in report["advice"] if line.startswith("Bottleneck:")]
    assert len(named) == 1 and named[0].startswith(HEADLINES[kind])  # the advice names this kind, and only it


def test_balanced_run_names_no_bottleneck():
    steps = [step(i, 4, 4, 4, 0.0, T1, 0.0) for i in range(60)] + [step(60, 0, 0, 0, 0.0, T1, 0.0)]
    report = analyse(steps)
    assert report["bottleneck"] == "none"
    assert not any(line.startswith("Bottleneck:") for line in report["advice"])


def test_acceptance_collapse_position_and_cli(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in trace("acceptance")))
    steps, _ = load_steps(str(path))
    assert analyse(steps)["acceptance_collapses_at"] == 1

    assert main(["explain", str(path), "--json", "--plots", str(tmp_path / "p")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bottleneck"] == "acceptance"
    assert_drawn(tmp_path / "p_timeline.png")


def test_one_token_pass_inferred_without_plain_steps_is_said_so():
    measured = analyse(trace("acceptance"))
    assert measured["t1_measured"] and not any("inferred" in line for line in measured["advice"])
    speculative_only = [s for s in trace("acceptance") if s["drafted"]]
    inferred = analyse(speculative_only)
    assert not inferred["t1_measured"]
    assert any("No plain step" in line and "inferred" in line for line in inferred["advice"])


def test_acceptance_by_position_is_conditional_wherever_it_is_reported():
    """Four 3-token chains accepting 0, 1, 3 and 2 tokens: position 1 is reached 4 times and
    accepted 3, position 2 reached 3 times (first accepted) and accepted 2, position 3 reached 2
    and accepted 1. The run's stats, explain and bench's summary all say 3/4, 2/3, 1/2, and the
    cost model's 1 + a1 + a1*a2 + a1*a2*a3 then gives the tokens per step the run had (2.5).
    Dividing by every step that drafted a position (3/4, 2/4, 1/4) would predict 2.22."""
    from specdecode.bench import PromptResult, summarize
    from specdecode.costmodel import CostModel, expected_tokens
    from specdecode.explain import acceptance_by_position
    from specdecode.stats import RunStats, StepRecord

    steps = [step(i, 3, 3, a, 0.001, T1) for i, a in enumerate([0, 1, 3, 2])]
    stats = RunStats()
    for s in steps:
        stats.add(StepRecord(**{k: v for k, v in s.items() if k != "type"}))
    want = [3 / 4, 2 / 3, 1 / 2]
    assert stats.acceptance_by_position == pytest.approx(want)
    assert acceptance_by_position(steps)[0] == pytest.approx(want)
    result = PromptResult(0, "x", 10, 1.0, 10, 1.0, True, steps, stats.to_json())
    summary = summarize([result], CostModel(target_s={1: T1}))
    assert summary["overall"]["acceptance_by_position"] == pytest.approx(want)
    assert summary["overall"]["reached_by_position"] == [4, 3, 2]
    emitted_per_step = sum(s["emitted"] for s in steps) / len(steps)
    assert expected_tokens(stats.acceptance_by_position, 3) == pytest.approx(emitted_per_step)

    # a tree step: 5 candidates over depth 2, first depth accepted; its positions are its depths
    tree = RunStats()
    tree.add(StepRecord(0, 5, 5, 1, 2, 0.001, T1, 0.0, 6, depth=2))
    assert (tree.drafted_at, tree.reached_at, tree.accepted_at) == ([1, 1], [1, 1], [1, 0])


def test_the_step_that_read_the_prompt_is_left_out(tmp_path):
    """The first token comes from the pass that read the prompt's end: that pass is prefill, and a
    1-token pass priced at its time would make every decoding step look cheap."""
    prefill = {**step(0, 0, 0, 0, 0.0, 50 * T1), "target_tokens": 200, "prompt_tokens": 200}
    decoding = trace("verification_cost")
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in [prefill] + decoding) + "\n")
    steps, _ = load_steps(str(path))
    assert steps == decoding
    assert analyse(steps)["bottleneck"] == "verification_cost"


def test_the_predicted_speedup_leaves_the_prompt_step_out():
    from specdecode.costmodel import CostModel, predicted_speedup_of_steps

    cost = CostModel(target_s={1: T1, 5: 1.05 * T1, 200: 50 * T1})
    decoding = trace("verification_cost")
    prefill = {**step(0, 0, 0, 0, 0.0, 50 * T1), "target_tokens": 200, "prompt_tokens": 200}
    assert predicted_speedup_of_steps([prefill] + decoding, cost) == predicted_speedup_of_steps(decoding, cost)


def test_explain_counts_tokens_and_passes_as_generate_does(tiny_target, tokenizer, tmp_path, capsys):
    """The pass that read the prompt gave the first token: explain counts it as generate does."""
    from specdecode import GenerationConfig
    from specdecode.drafters.ngram import NgramDrafter
    from specdecode.engine import SpeculativeDecoder
    from specdecode.trace import TraceWriter

    path = tmp_path / "run.jsonl"
    trace = TraceWriter(str(path))
    dec = SpeculativeDecoder(tiny_target, tokenizer, NgramDrafter())
    result = dec.generate("the cat sat on the mat the cat sat on the", GenerationConfig(
        max_new_tokens=30, ignore_eos=True, policy="fixed", draft_len=4), chat=False, trace=trace)
    trace.close()
    assert main(["explain", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == result.stats.new_tokens == 30
    assert report["tokens_per_target_pass"] == pytest.approx(result.stats.mean_accepted_length)
    assert report["passes"] == report["steps"] + 1


def test_a_position_never_reached_is_not_reported_as_zero_acceptance():
    steps = [step(i, 3, 3, 0, 0.0001, T1) for i in range(20)]  # position 1 always rejected: 2 and 3 never tested
    report = analyse(steps)
    assert report["reached_by_position"] == [20, 0, 0]
    first = next(line for line in report["advice"] if line.startswith("Acceptance"))
    assert "1:0.00" in first and "2:" not in first and "3:" not in first
