"""Continuous batching on the llama.cpp backend: every request in a batch gets exactly the tokens
it gets alone, caches stay equal to a fresh prefill after ragged rollback, the verification
budget behaves as designed, and seeded sampling does not depend on the batch."""

from __future__ import annotations

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.batching.budget import PassCost, Request, allocate
from specdecode.config import ConfigError
from specdecode.costmodel import CostModel
from specdecode.policy import policy_maker
from specdecode.stats import StepRecord

llama_cpp = pytest.importorskip("llama_cpp")

from specdecode.api import load  # noqa: E402
from specdecode.batching import BatchEngine  # noqa: E402
from specdecode.batching.plan import StepPlan, prompt_chunks  # noqa: E402
from specdecode.runners.llamacpp_batch import Block, LlamaCppBatchRunner, micro_batches, pass_shape  # noqa: E402

QUESTIONS = [
    "Write a haiku about rain.",
    "Repeat exactly: red, green, blue, red, green, blue, yellow, red, green, blue.",
    "What is 17 times 23? Show the steps.",
    "Explain the difference between TCP and UDP in two sentences.",
    "Name three rivers in Europe.",
]
# past 256 cached tokens llama.cpp's 1-token attention would take a path of its own
LONG = "Summarize this text. " + " ".join(f"Sentence {i} says the value of item {i} is {i * 7}." for i in range(24))


@pytest.fixture(scope="module")
def decoders():
    return load(None, "none", backend="llamacpp"), load(None, "ngram", backend="llamacpp")


def _run(engine: BatchEngine, prompts, configs, cancel_after: dict | None = None) -> dict[int, list[int]]:
    seqs = {engine.add(p, c).id: i for i, (p, c) in enumerate(zip(prompts, configs))}
    out = {i: [] for i in range(len(prompts))}
    steps = 0
    while engine.running:
        for seq, event in engine.step():
            out[seqs[seq.id]] += event.token_ids
        steps += 1
        for seq in list(engine.running.values()):
            if cancel_after and cancel_after.get(seqs[seq.id]) == steps:
                engine.cancel(seq)
    return out


@pytest.mark.parametrize("drafter", [0, 1], ids=["plain", "ngram"])
def test_every_request_in_a_batch_gets_the_tokens_it_gets_alone(decoders, drafter):
    alone = decoders[drafter]
    prompts = [alone.encode(q) for q in QUESTIONS + [LONG]]
    # ragged lengths: one request finishes after 5 tokens while the others go on
    configs = [GenerationConfig(max_new_tokens=5 if i == 1 else 40, ignore_eos=True) for i in range(len(prompts))]
    want = [alone.generate(p, c).token_ids for p, c in zip(prompts, configs)]
    engine = BatchEngine.for_decoder(alone, 8, 1024, max_step_tokens=48)  # the long prompt takes several chunks
    got = _run(engine, prompts, configs)
    assert [got[i] for i in range(len(prompts))] == want
    assert not engine.running


def test_a_cancelled_request_leaves_the_others_unchanged(decoders):
    alone = decoders[1]
    prompts = [alone.encode(q) for q in QUESTIONS[:3]]
    configs = [GenerationConfig(max_new_tokens=24, ignore_eos=True)] * 3
    want = [alone.generate(p, c).token_ids for p, c in zip(prompts, configs)]
    engine = BatchEngine.for_decoder(alone, 4, 512)
    got = _run(engine, prompts, configs, cancel_after={0: 3})
    assert got[1] == want[1] and got[2] == want[2]
    assert got[0] == want[0][: len(got[0])] and len(got[0]) < 24
    assert not engine.running and engine.free_slots == 4


def test_seeded_sampling_gives_the_same_tokens_alone_and_batched_with_any_drafter(decoders):
    prompts = [decoders[0].encode(q) for q in QUESTIONS]
    sampled = GenerationConfig(max_new_tokens=32, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = _run(BatchEngine.for_decoder(decoders[0], 1, 512), prompts[1:2], [sampled])[0]
    for decoder in decoders:
        engine = BatchEngine.for_decoder(decoder, 5, 512)
        configs = [sampled if i == 1 else GenerationConfig(max_new_tokens=20 + i, temperature=0.7, seed=i)
                   for i in range(len(prompts))]
        assert _run(engine, prompts, configs)[1] == alone
    for decoder in decoders:  # the single engine (generate, serve --max-batch 1) settles by the same rule
        assert decoder.generate(prompts[1], sampled).token_ids == alone
    other_seed = _run(BatchEngine.for_decoder(decoders[0], 1, 512), prompts[1:2], [sampled.with_(seed=99)])[0]
    assert other_seed != alone  # the seed matters: the test could fail


def test_a_slot_cut_back_scores_as_a_fresh_prefill(decoders):
    dec = decoders[0]
    ids = dec.encode(LONG)
    runner = LlamaCppBatchRunner(dec.model, 3, 1024, dec.vocab_size)
    runner.forward([Block(0, ids[:40], 0), Block(2, ids, 0)])
    runner.forward([Block(0, [7, 8, 9], 3), Block(2, [100, 200, 300, 400], 4)])  # rejected blocks
    runner.truncate(2, len(ids))
    runner.truncate(0, 40)
    after = runner.forward([Block(0, [500], 1), Block(2, [500, 600], 2)])
    alone = LlamaCppBatchRunner(dec.model, 1, 1024, dec.vocab_size)
    want = alone.forward([Block(0, ids + [500, 600], 2)])[0]
    assert torch.equal(after[2], want)
    assert runner.cached[2] == ids + [500, 600] and runner.cached[0] == ids[:40] + [500]


def test_a_prompt_reads_only_what_a_free_slot_does_not_hold_and_gets_the_same_tokens(decoders):
    alone = decoders[1]
    first = alone.encode(QUESTIONS[0])
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    engine = BatchEngine.for_decoder(alone, 3, 512)
    answer = _run(engine, [first], [config])[0]
    # a conversation's next turn: the first prompt and answer, then more
    follow = first + answer + alone.encode("And one about snow.")[1:]
    other = alone.encode(QUESTIONS[2])
    want = [alone.generate(p, config).token_ids for p in (follow, other)]
    read = []
    forward = engine.runner.forward
    engine.runner.forward = lambda blocks: read.append(sum(len(b.tokens) for b in blocks)) or forward(blocks)
    seqs = [engine.add(follow, config), engine.add(other, config)]
    held = [s.read for s in seqs]
    assert seqs[0].slot == 0 and held[0] >= len(first) + len(answer) - 1  # the slot the first turn left
    assert seqs[1].slot == 1 and held[1] == 0  # the other free slots hold nothing: the lowest
    got = {s.id: [] for s in seqs}
    while engine.running:
        for seq, event in engine.step():
            got[seq.id] += event.token_ids
    assert [got[s.id] for s in seqs] == want
    assert read[0] == len(follow) - held[0] + len(other)  # the first pass read both prompts' rest


# ---- the verification budget on constructed cases -------------------------------------------------
COST = PassCost(fixed_s=0.010, per_token_s=0.007)  # about this CPU's curve


def test_one_request_drafts_while_its_tokens_are_likely():
    lengths = allocate([Request(0, [0.9, 0.8, 0.7, 0.3, 0.1])], {}, COST, 128)
    # a token pays while its chance exceeds (tokens per second so far) x 7 ms
    assert lengths == {0: 4}


def test_speculation_shrinks_to_nothing_as_the_batch_grows():
    drafts = [0.6, 0.4, 0.2]
    taken = [sum(allocate([Request(s, drafts) for s in range(n)], {}, COST, 512).values()) - n for n in (1, 4, 16, 32)]
    assert taken[0] > 0 and taken[-1] == 0
    assert taken == sorted(taken, reverse=True)


def test_nearly_sure_tokens_are_taken_even_in_a_large_batch():
    requests = [Request(s, [0.3]) for s in range(15)] + [Request(15, [0.99, 0.99, 0.98])]
    lengths = allocate(requests, {}, COST, 512)
    assert lengths[15] == 4 and all(lengths[s] == 1 for s in range(15))


def test_the_pass_never_exceeds_its_token_budget():
    lengths = allocate([Request(s, [1.0] * 7) for s in range(4)], {4: 20}, COST, 30)
    assert sum(lengths.values()) + 20 <= 30


def test_pass_cost_fit_recovers_a_straight_line():
    cost = PassCost.measure(lambda n: 0.004 + 0.006 * n)
    assert cost.fixed_s == pytest.approx(0.004) and cost.per_token_s == pytest.approx(0.006)


def test_pass_cost_fit_tells_micro_batches_from_tokens():
    cost = PassCost(0.001, 0.001)
    for u, n in [(1, 16), (2, 17), (1, 4), (4, 20), (3, 64), (1, 2)] * 3:
        cost.observe(n, 0.009 * u + 0.005 * n, u)
    assert cost.fixed_s == pytest.approx(0.009) and cost.per_token_s == pytest.approx(0.005)
    assert cost.seconds(17, 2) == pytest.approx(0.009 * 2 + 0.005 * 17)
    assert cost.one_token_s is None and cost.lone_s == pytest.approx(0.014)  # no lone token timed yet


def test_pass_cost_prices_a_lone_token_apart():
    # llama.cpp on 2 cores: a lone token runs matrix-vector kernels, 8 ms; 2 tokens 16 ms, then ~3 ms each
    def seconds(n, u=1, v=0):
        return 0.008 * v + 0.010 * (u - v) + 0.003 * (n - v)

    cost = PassCost.measure(lambda n: seconds(n, 1, int(n == 1)))  # one micro-batch each
    assert (cost.one_token_s, cost.fixed_s, cost.per_token_s) == pytest.approx((0.008, 0.010, 0.003))
    for n, u, v in [(17, 2, 1), (3, 3, 3), (16, 1, 0)] * 2:  # ragged passes keep the fit
        cost.observe(n, seconds(n, u, v), u, v)
    assert cost.seconds(17, 2, 1) == pytest.approx(0.008 + 0.010 + 0.003 * 16)
    assert cost.floor(3) == pytest.approx(0.019) and cost.floor(1) == pytest.approx(0.008)
    # a request decoding alone: a second token costs 8 ms more, as much as a step of its own, so a
    # drafted token pays only when a second one comes with it nearly surely
    assert allocate([Request(0, [0.9])], {}, cost, 128, pass_shape) == {0: 1}
    assert allocate([Request(0, [0.9, 0.8])], {}, cost, 128, pass_shape) == {0: 3}
    line = PassCost(0.010 + 0.003 / 3, 0.003 + 0.003 / 3)  # a straight line through these passes
    assert allocate([Request(0, [0.9])], {}, line, 128, pass_shape) == {0: 2}  # the control: it drafts


def test_a_draft_that_needs_a_micro_batch_of_its_own_is_priced_as_one():
    # slot 5 alone sends a drafted token: llama.cpp runs it as a second micro-batch of one token
    assert micro_batches({s: 2 if s == 5 else 1 for s in range(16)}) == [16, 1]
    requests = [Request(s, [0.95, 0.9] if s == 5 else []) for s in range(16)]
    assert allocate(requests, {}, COST, 512)[5] > 1  # priced as one more token of one pass
    assert allocate(requests, {}, COST, 512, pass_shape)[5] == 1
    # one request alone: its drafted tokens share its micro-batch and still pay
    assert allocate([Request(0, [0.95, 0.9])], {}, COST, 512, pass_shape)[0] == 3


def test_a_likely_token_that_merges_micro_batches_is_sent():
    # slots 0 and 2 send a nearly sure token each: alone, two extra micro-batches of one token;
    # slot 1's middling token makes the three blocks equal, one micro-batch of 6
    requests = [Request(0, [0.99]), Request(1, [0.5]), Request(2, [0.99])]
    assert micro_batches({0: 2, 1: 1, 2: 2}) == [3, 1, 1] and micro_batches({0: 2, 1: 2, 2: 2}) == [6]
    assert allocate(requests, {}, COST, 512, pass_shape) == {0: 2, 1: 2, 2: 2}


def test_micro_batches_are_the_ones_llama_cpp_runs(decoders, monkeypatch):
    """``micro_batches`` against llama.cpp's own split of ragged passes (its batch debug log)."""
    import ctypes
    import random
    import re

    from specdecode.runners import llamacpp

    monkeypatch.setenv("LLAMA_BATCH_DEBUG", "1")  # read when a context is created
    dec = decoders[0]
    runner = LlamaCppBatchRunner(dec.model, 8, 256, dec.vocab_size)
    lib, lines = dec.model.lib, []
    log = lib.llama_log_callback(lambda level, text, user: lines.append(text.decode(errors="replace")))
    lib.llama_log_set(log, ctypes.c_void_p(0))
    try:
        rng = random.Random(0)
        shapes = [{0: 40, 1: 1}, {0: 1, 2: 1}] + [
            {s: rng.randint(1, 5) for s in sorted(rng.sample(range(8), rng.randint(1, 8)))} for _ in range(12)]
        for shape in shapes:
            lines.clear()
            runner.forward([Block(s, list(range(300, 300 + n)), 1) for s, n in shape.items()])
            split = re.findall(r"added ubatch to split:\s*\n.*?n_tokens\s*=\s*(\d+)", "".join(lines), re.S)
            assert [int(n) for n in split] == micro_batches(shape), shape
            for s in shape:
                runner.clear(s)
    finally:
        lib.llama_log_set(llamacpp._QUIET_LOG, ctypes.c_void_p(0))


def test_batching_refuses_what_it_cannot_do():
    dec = load(None, "ngram", backend="llamacpp")
    with pytest.raises(ConfigError) as err:
        BatchEngine.for_decoder(dec, 0)
    assert err.value.param == "max_batch"
    engine = BatchEngine.for_decoder(dec, 2, 256)
    with pytest.raises(ConfigError) as err:
        engine.add(dec.encode("hi"), GenerationConfig(max_new_tokens=300))
    assert err.value.param == "max_new_tokens"


def test_a_short_prompt_is_read_before_a_long_one_that_still_moves(decoders):
    dec = decoders[0]
    engine = BatchEngine.for_decoder(dec, 3, 1024, max_step_tokens=32)
    long = engine.add(dec.encode(LONG), GenerationConfig(max_new_tokens=4))
    short = engine.add(dec.encode(QUESTIONS[0]), GenerationConfig(max_new_tokens=4))
    chunks = prompt_chunks([long, short], 32)
    assert chunks[long][0] == 32 // 4 and not chunks[long][1]  # the oldest's share
    assert chunks[short][0] == 24 and not chunks[short][1]
    first_token_steps = {}
    steps = 0
    while engine.running:
        steps += 1
        for seq, event in engine.step():
            first_token_steps.setdefault(seq.id, steps)
    assert first_token_steps[short.id] < first_token_steps[long.id]


def test_a_prompt_read_in_the_pass_leaves_no_room_for_guesses():
    alone = allocate([Request(0, [0.6, 0.5])], {}, COST, 128)
    reading = allocate([Request(0, [0.6, 0.5])], {1: 60}, COST, 128)
    assert alone[0] > 1 and reading[0] == 1


def test_an_unsent_draft_is_judged_by_the_tokens_then_emitted(decoders):
    """A request the budget keeps from drafting still learns its acceptance: the draft it did not
    send is scored against the tokens it emits next, as verification would have scored it."""
    engine = BatchEngine.for_decoder(decoders[1], 2, 256, max_step_tokens=16)
    s = engine.add(decoders[1].encode(QUESTIONS[0]), GenerationConfig(max_new_tokens=8))
    plain = StepRecord(0, 0, 0, 0, 1, 0.0, 0.0, 0.0, 1)  # a step that sent no draft: only the judging moves

    def judge(s):  # after each step: the tokens emitted so far judge the unsent draft
        engine.planner.emitted(s, plain, StepPlan({}, {}, {}))

    acceptance = s.policy.estimate
    s.unsent = (len(s.context), [7, 8, 9])
    s.context.append(7)
    judge(s)
    assert s.unsent is not None and acceptance.tried == [0.0] * len(acceptance.tried)  # not settled
    s.context.append(5)  # the second drafted token would have been rejected
    judge(s)
    assert s.unsent is None
    assert acceptance.tried[:3] == [1.0, 1.0, 0.0] and acceptance.passed[:2] == [1.0, 0.0]
    s.unsent = (len(s.context), [4, 4])
    s.context += [4, 4]
    judge(s)
    assert s.unsent is None and acceptance.passed[:2] == [1.0 * 0.95 + 1, 1.0]


def test_every_policy_plans_its_own_requests_in_a_batch(decoders):
    """heuristic and confidence run beside budgeted requests: each gets the tokens it gets alone,
    and the heuristic's draft lengths follow its own schedule (+2 after a fully accepted block, -1
    otherwise), not the budget's."""
    dec = decoders[1]
    policies = ["heuristic", "cost", "confidence", "fixed"]
    prompts = [dec.encode(QUESTIONS[1]), dec.encode(QUESTIONS[0]), dec.encode(QUESTIONS[2]), dec.encode(QUESTIONS[3])]
    configs = [GenerationConfig(max_new_tokens=40, ignore_eos=True, policy=p, draft_len=4) for p in policies]
    want = [dec.generate(p, c).token_ids for p, c in zip(prompts, configs)]
    engine = BatchEngine.for_decoder(dec, 4, 512)
    seqs = [engine.add(p, c) for p, c in zip(prompts, configs)]
    got, records = {s.id: [] for s in seqs}, {s.id: [] for s in seqs}
    while engine.running:
        for seq, event in engine.step():
            got[seq.id] += event.token_ids
            records[seq.id].append(event.step)
    assert [got[s.id] for s in seqs] == want
    assert [s.stats.policy for s in seqs] == policies
    tau, changed = 4, 0
    for rec in records[seqs[0].id][1:]:  # the first step's token came with the prompt, drafting nothing
        assert rec.draft_len == tau
        if rec.drafted:
            new = min(tau + 2, 4) if rec.accepted == rec.drafted else max(1, tau - 1)
            changed += new != tau
            tau = new
    assert changed  # the schedule moved, so the check above could catch the budget's lengths


def test_a_request_alone_in_a_batch_engine_is_timed_for_its_policy(decoders):
    """A request's cost curve learns only from passes it had to itself: alone in a 4-slot engine
    its steps are timed; beside another request, none are."""
    dec = decoders[1]

    class Counted(CostModel):
        def observe_target(self, n, seconds):
            timed.append(n)
            super().observe_target(n, seconds)

    timed = []
    runner = BatchEngine.for_decoder(dec, 4, 512).runner
    engine = BatchEngine(runner, dec.tokenizer, dec.eos_ids, dec.drafter.spawn, 64, COST,
                         vocab_size=dec.vocab_size, policy_for=policy_maker(Counted()))
    first = engine.add(dec.encode(QUESTIONS[1]), GenerationConfig(max_new_tokens=60, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert len(timed) == 3  # the step that read the prompt is not the request's own cost
    engine.add(dec.encode(QUESTIONS[0]), GenerationConfig(max_new_tokens=60, ignore_eos=True))
    del timed[:]
    for _ in range(4):
        engine.step()
    assert timed == [] and len(first.output.tokens) < 60


def test_fixed_blocks_and_prompt_chunks_stay_within_the_step(decoders):
    dec = decoders[1]
    engine = BatchEngine.for_decoder(dec, 4, 512, max_step_tokens=12)
    sizes, forward = [], engine.runner.forward
    engine.runner.forward = lambda blocks: sizes.append(sum(len(b.tokens) for b in blocks)) or forward(blocks)
    prompts = [dec.encode(q) for q in (QUESTIONS[1], QUESTIONS[1], LONG)]
    # the long prompt's request decodes alone at the end, where its policy plans blocks of 17
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True, policy="fixed", draft_len=16) for n in (24, 24, 64)]
    got = _run(engine, prompts, configs)
    assert max(sizes) <= 12 and len(sizes) > 10
    assert [got[i] for i in range(3)] == [dec.generate(p, c).token_ids for p, c in zip(prompts, configs)]


def test_a_pass_returns_logits_of_its_own_that_the_next_pass_leaves_alone(decoders):
    # llama.cpp reuses its output buffer at every decode; what a pass returned must not change
    dec = decoders[0]
    runner = LlamaCppBatchRunner(dec.model, 2, 64, dec.vocab_size)
    first = runner.forward([Block(0, [300, 301, 302], 2), Block(1, [310], 1)])
    kept = {slot: rows.clone() for slot, rows in first.items()}
    runner.forward([Block(0, [303], 1), Block(1, [311, 312], 2)])
    for slot, rows in first.items():
        assert torch.equal(rows, kept[slot]), slot
