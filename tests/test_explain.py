"""explain names the bottleneck of constructed traces, one per kind."""

import json

import pytest

from specdecode.explain import analyse, cmd_explain, load_steps


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


@pytest.mark.parametrize("kind", ["policy_off", "acceptance", "draft_cost", "verification_cost", "overhead"])
def test_bottleneck_is_named(kind):
    report = analyse(trace(kind))
    assert report["bottleneck"] == kind
    assert any(kind.split("_")[0] in line.lower() or "speculation was off" in line for line in report["advice"])


def test_acceptance_collapse_position_and_cli(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in trace("acceptance")))
    steps, _ = load_steps(str(path))
    assert analyse(steps)["acceptance_collapses_at"] == 1

    class Args:
        trace, json, plots = str(path), True, str(tmp_path / "p")

    assert cmd_explain(Args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bottleneck"] == "acceptance"
    assert (tmp_path / "p_timeline.png").stat().st_size > 1000


def test_one_token_pass_inferred_without_plain_steps_is_said_so():
    measured = analyse(trace("acceptance"))
    assert measured["t1_measured"] and not any("inferred" in line for line in measured["advice"])
    speculative_only = [s for s in trace("acceptance") if s["drafted"]]
    inferred = analyse(speculative_only)
    assert not inferred["t1_measured"]
    assert any("No plain step" in line and "inferred" in line for line in inferred["advice"])
