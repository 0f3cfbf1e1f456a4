"""ik_llama.cpp built from its sdist with our patches (ik/build.py, ik/patches/): a test per patch,
each of which fails on the unpatched source, and the batch-invariant mode the ik backend runs in.

Skipped where the prebuilt wheel is in use (make setup keeps it only where nothing can compile)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from specdecode.config import MAX_BLOCK
from specdecode.models import default_gguf_path
from specdecode.runners import ik_api

PATCHES = Path(__file__).resolve().parents[1] / "ik" / "patches"
INFO = ik_api.build_info()
pytestmark = pytest.mark.skipif(not INFO["patches"], reason=f"not our build of ik_llama.cpp: {INFO['source']}")

CONTEXT = 1024
REFERENCE = 700  # tokens scored one at a time: the reference every longer pass is held to
LENGTHS = (1, 2, 7, 16, 31, 32, 33, 48, 64, 100, 128, 255, 256, 512)
LATER = 150  # where the second pass of each length starts
# The repacking kernel quantizes activations otherwise (bf16 scales) and sums in another order, so
# it differs from the weights' own kernel by about as much as either differs from the unquantized
# arithmetic; what a kernel that loses blocks cannot do is stay as close to the fp32 model. Measured
# (512 tokens from position 0): mean |logit - fp32| 0.147 for 1-token passes, 0.158 for the
# repacked pass, argmax agreeing with fp32's at 88.3% and 88.7% of positions.
CLOSENESS = 1.25  # the repacked pass's mean distance to fp32, at most this times the 1-token passes'
ARGMAX_SLACK = 0.05  # its argmax agreement with fp32 at most this far below theirs


@pytest.fixture(scope="module")
def model():
    from specdecode.runners.ik import IkModel

    return IkModel(default_gguf_path(), context=CONTEXT, max_block=MAX_BLOCK)


@pytest.fixture(scope="module")
def ids(model) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, model.config.vocab_size, (REFERENCE,), generator=generator).tolist()


@contextlib.contextmanager
def repack_min_rows(rows: int):
    """Products of ``rows`` activation rows or more take the repacking kernel (0: ik's own choice)."""
    lib = ik_api.load()
    before = lib.iqk_get_repack_min_rows()
    lib.iqk_set_repack_min_rows(rows)
    try:
        yield
    finally:
        lib.iqk_set_repack_min_rows(before)


@pytest.fixture(scope="module")
def one_token(model, ids) -> torch.Tensor:
    """``[REFERENCE, vocab]``: each position's logits from a pass of that one token."""
    from specdecode.runners.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(model)
    with repack_min_rows(ik_api.NEVER_REPACK):
        return torch.cat([runner.forward([token], 1) for token in ids])


def scored(model, ids, start: int, length: int) -> torch.Tensor:
    """``[length, vocab]``: positions start..start+length-1 scored in one pass after 1-token passes."""
    from specdecode.runners.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(model)
    for token in ids[:start]:
        runner.forward([token], 1)
    return runner.forward(ids[start:start + length], length)


def test_the_build_in_use_names_every_patch_in_the_repository():
    assert [p["name"] for p in INFO["patches"]] == sorted(p.name for p in PATCHES.glob("*.patch"))
    assert "sdist" in ik_api.describe() and "0004-repack-min-rows" in ik_api.describe()


def test_iks_own_llama_server_builds_and_names_the_sdist_it_came_from():
    """Patches 0001 (common's build-info script) and 0002 (the binding builds and installs it)."""
    binary = ik_api.server_binary()
    assert binary is not None, "no llama-server beside the library"
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-500:]
    assert "sdist-0.1.5" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def fp32(model, ids, default_target) -> torch.Tensor:
    """``[512, vocab]``: the first 512 positions' logits from the same file dequantized, in fp32
    (the torch backend), the reference both ik kernels round away from."""
    from specdecode.runners import make_runner

    return make_runner(default_target.model).forward(ids[:512], 512)[:, :model.config.vocab_size]


@pytest.mark.parametrize("start,length", [(0, 32), (LATER, 64), (0, 512)])
def test_a_pass_on_the_repacking_kernel_is_as_close_to_fp32_as_one_token_passes(model, ids, one_token, fp32,
                                                                                 start, length):
    """Patch 0003: with ik's own switch, 32+ rows repack Q4_1 to Q8_1_R8, whose x86 kernels
    dropped the last 2 of a 576-wide row's 18 blocks."""
    with repack_min_rows(0):
        logits = scored(model, ids, start, length)
    exact, own = fp32[start:start + length], one_token[start:start + length]
    assert (logits - exact).abs().mean() <= CLOSENESS * (own - exact).abs().mean()
    def agreement(x):
        return (x.argmax(-1) == exact.argmax(-1)).float().mean().item()

    assert agreement(logits) >= agreement(own) - ARGMAX_SLACK


@pytest.mark.parametrize("start", [0, LATER])
def test_every_pass_length_gives_the_one_token_logits_bit_for_bit_when_nothing_repacks(model, ids, one_token, start):
    """Patch 0004, as the ik backend runs it (``ik_api.NEVER_REPACK``)."""
    with repack_min_rows(ik_api.NEVER_REPACK):
        for length in LENGTHS:
            if start + length <= REFERENCE:
                assert torch.equal(scored(model, ids, start, length), one_token[start:start + length]), length


def test_with_iks_own_switch_a_64_token_pass_is_not_bit_identical(model, ids, one_token):
    """The negative control of the test above: the switch by row count changes the logits."""
    with repack_min_rows(0):
        logits = scored(model, ids, LATER, 64)
    assert not torch.equal(logits, one_token[LATER:LATER + 64])


def _questions(tmp_path) -> str:
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [text]}) for i, text in
                              enumerate(["Repeat: one two three one two three", "Name three colours."])))
    return str(data)


def test_bench_compares_with_iks_own_server_plain_and_with_its_ngram_speculation(tmp_path, capsys):
    from specdecode.cli import main

    argv = ["bench", "--dataset", _questions(tmp_path), "--compare", "ik_server", "--max-new-tokens", "12",
            "--quiet", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["overall"]["ratio_vs_ik_server"] > 0 and results["overall"]["ratio_vs_ik_server_ngram"] > 0
    assert results["config"]["engine"] == ik_api.describe() and "engine: ik_llama.cpp" in capsys.readouterr().out


def test_loadtest_starts_iks_own_server_by_name_and_loads_it(tmp_path):
    from specdecode.cli import main

    server = "ik2=ik -np 2 -c 2048 -fa off --log-disable"
    argv = ["loadtest", "--dataset", _questions(tmp_path), "--llama-server", server, "--concurrency", "2",
            "--requests", "2", "--max-tokens", "6", "--no-progress", "--out", str(tmp_path / "l")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "l" / "results.json").read_text())["rows"]
    assert [(r["server"], r["requests"], r["failed"], r["output_tokens"]) for r in rows] == [("ik2", 2, 0, 12)]


# ---- patch 0005: a KV stream per sequence -----------------------------------------------------
SLOT_CONTEXT = 512
STREAM_PASSES = 7


def _schedule(slots: int, seed: int) -> list[list[tuple]]:
    """Passes of a random serving run: per pass, (slot, tokens, logits wanted, tokens kept after)
    for the slots in it. A slot's first block is a prompt (or a prompt chunk); later blocks are
    drafted blocks or more prompt, of any length the pass can hold, and a random number of each
    block's tokens is rolled back after its pass (rejected drafts); some slots sit passes out, and
    some are cleared and start again."""
    generator = torch.Generator().manual_seed(seed)

    def rand(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    held, passes = [0] * slots, []
    widest = MAX_BLOCK // slots
    for _ in range(STREAM_PASSES):
        blocks = []
        for slot in range(slots):
            if rand(0, 9) < 2:
                continue  # sits this pass out
            if held[slot] and rand(0, 9) == 0:
                held[slot] = 0
                blocks.append((slot, "clear"))
                continue
            n = rand(1, min(widest, SLOT_CONTEXT - held[slot] - 1))
            tokens = torch.randint(100, 40000, (n,), generator=generator).tolist()
            kept = held[slot] + (n if rand(0, 1) else rand(0, n))
            blocks.append((slot, tokens, min(n, rand(1, 4)), kept))
            held[slot] = kept
        passes.append(blocks)
    return passes


def _run_together(runner, passes) -> dict[int, list[torch.Tensor]]:
    """Each slot's logits, pass by pass, with every slot's block in one pass."""
    from specdecode.runners.base import Block

    out: dict[int, list[torch.Tensor]] = {}
    for blocks in passes:
        for slot, *op in blocks:
            if op == ["clear"]:
                runner.clear(slot)
        scored = [Block(slot, tokens, logits) for slot, *op in blocks if op != ["clear"]
                  for tokens, logits, _ in [op]]
        if scored:
            for slot, rows in runner.forward(scored).items():
                out.setdefault(slot, []).append(rows)
        for slot, *op in blocks:
            if op != ["clear"]:
                runner.truncate(slot, op[2])
    return out


def _run_alone(model, passes, slot: int) -> list[torch.Tensor]:
    """The same slot's blocks, rollbacks and clears in a context of its own."""
    from specdecode.runners.llamacpp import LlamaCppRunner

    runner, out = LlamaCppRunner(model, capacity=SLOT_CONTEXT), []
    for blocks in passes:
        for s, *op in blocks:
            if s != slot:
                continue
            if op == ["clear"]:
                runner.reset()
                continue
            tokens, logits, kept = op
            out.append(runner.forward(tokens, logits))
            runner.truncate(kept)
    return out


def _slots_that_differ(model, runner, passes) -> list[int]:
    together = _run_together(runner, passes)
    return [slot for slot, rows in together.items()
            if not all(torch.equal(a, b) for a, b in zip(rows, _run_alone(model, passes, slot), strict=True))]


@pytest.mark.parametrize("slots", [2, 4, 8, 16])
def test_with_a_kv_stream_per_sequence_each_gets_its_logits_alone_bit_for_bit(model, slots):
    """Patch 0005: every slot in one context and one llama_decode per pass (prompt chunks, drafted
    blocks and rollbacks mixed), each slot's logits equal to its own context's."""
    from specdecode.runners.ik import IkStreamBatchRunner

    runner = model.batch_runner(slots, SLOT_CONTEXT)
    assert isinstance(runner, IkStreamBatchRunner)
    passes = _schedule(slots, seed=slots)
    assert _slots_that_differ(model, runner, passes) == []


def test_a_slot_decoding_alone_reuses_its_graph_and_stays_exact(model):
    """One token a pass from one slot is the case ik reuses its last graph for, with new inputs (the
    cells K and V go to among them); a stream graph is reused for the same slot only (its views
    start at that slot's cells)."""
    # both slots' cells padded to 64, so only the slot tells one slot's graph from the other's
    prompt = [(0, list(range(300, 340)), 1, 40), (1, list(range(500, 538)), 1, 38)]
    held, passes = {0: 40, 1: 38}, [prompt]
    for i, slot in enumerate([0, 0, 0, 1, 1, 0, 0]):
        held[slot] += 1
        passes.append([(slot, [1000 + i], 1, held[slot])])
    runner = model.batch_runner(2, SLOT_CONTEXT)
    assert _slots_that_differ(model, runner, passes) == []


def test_without_streams_sequences_sharing_the_pool_get_other_logits(model):
    """The negative control: the same run in ik's one pool (no streams) differs from alone."""
    from specdecode.runners.llamacpp_batch import LlamaCppBatchRunner

    runner = LlamaCppBatchRunner(model, 8, SLOT_CONTEXT)
    assert _slots_that_differ(model, runner, _schedule(8, seed=8)) != []


def test_a_batch_that_breaks_the_stream_layout_is_refused(model):
    """A position past a stream, or a sequence's tokens apart in the batch: decode fails, no cell
    changes (ik logs why)."""
    from specdecode.runners.ik import KV_PAD

    runner = model.batch_runner(2, SLOT_CONTEXT)
    lib, b = runner.lib, runner.batch
    for n, (seq, pos) in enumerate([(0, 0), (1, 0), (0, 1)]):  # sequence 0 split by sequence 1
        b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = 100, pos, 1, seq, 1
    b.n_tokens = 3
    assert lib.llama_decode(runner.ctx, b) != 0
    b.pos[0], b.seq_id[0][0], b.n_tokens = -(-SLOT_CONTEXT // KV_PAD) * KV_PAD, 0, 1  # past its stream
    assert lib.llama_decode(runner.ctx, b) != 0
    passes = [[(0, [100, 101], 2, 2)]]  # and the context still holds nothing, so scores as alone
    assert _slots_that_differ(model, runner, passes) == []
