"""The ik_llama.cpp backend: our declaration of its C API (a test per binding), blocks scored as
1-token passes score them, greedy speculation identical to plain decoding through it, a request's
logits the same alone and beside 15 others, and ``auto`` choosing it only where it passes its check.

Skipped, with the check's reason, where the wheel does not install or load or fails the check."""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.config import MAX_BLOCK, ConfigError
from specdecode.models import default_gguf_path, load_model, resolve_backend
from specdecode.runners import ik_api
from specdecode.runners.base import Block

from conftest import CHAT_PROMPTS

PROBE = ik_api.probe(default_gguf_path())
pytestmark = pytest.mark.skipif(not PROBE.ok, reason=f"ik_llama.cpp does not run here: {PROBE.reason}")

PROMPTS = CHAT_PROMPTS


@pytest.fixture(scope="module")
def ik_target():
    return load_model(None, backend="ik")


@pytest.fixture(scope="module")
def lib():
    return ik_api.load()


@pytest.fixture()
def context(ik_target, lib):
    """A bare context of 256 cells for 2 sequences, and a batch to fill; freed after the test."""
    ctx = ik_target.model.new_context(128, streams=2)
    batch = lib.llama_batch_init(MAX_BLOCK, 0, 1)
    yield ctx, batch
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)


def decode(lib, ctx, batch, seq: int, tokens: list[int], start: int = 0) -> None:
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
        batch.seq_id[i][0], batch.logits[i] = seq, 1
    batch.n_tokens = len(tokens)
    assert lib.llama_decode(ctx, batch) == 0


def logits_of(lib, ctx, rows: int, n_vocab: int) -> torch.Tensor:
    return torch.tensor([lib.llama_get_logits(ctx)[i] for i in range(rows * n_vocab)]).view(rows, n_vocab)


# ---- the bindings, one test each ---------------------------------------------------------------
def test_kv_cache_seq_rm_removes_positions_so_they_can_be_scored_again(ik_target, lib, context):
    ctx, batch = context
    n_vocab = ik_target.model.config.vocab_size
    decode(lib, ctx, batch, 0, [10, 11, 12])
    first = logits_of(lib, ctx, 3, n_vocab)[2]
    assert lib.llama_kv_cache_seq_rm(ctx, 0, 2, -1)
    assert lib.llama_kv_cache_seq_pos_max(ctx, 0) == 1
    decode(lib, ctx, batch, 0, [12], start=2)
    assert torch.equal(logits_of(lib, ctx, 1, n_vocab)[0], first)


def test_kv_cache_seq_cp_gives_another_sequence_the_same_context(ik_target, lib, context):
    ctx, batch = context
    n_vocab = ik_target.model.config.vocab_size
    decode(lib, ctx, batch, 0, [10, 11])
    lib.llama_kv_cache_seq_cp(ctx, 0, 1, -1, -1)
    assert lib.llama_kv_cache_seq_pos_max(ctx, 1) == 1
    decode(lib, ctx, batch, 1, [12], start=2)
    on_copy = logits_of(lib, ctx, 1, n_vocab)[0]
    lib.llama_kv_cache_seq_rm(ctx, 1, -1, -1)
    decode(lib, ctx, batch, 0, [12], start=2)
    assert torch.equal(logits_of(lib, ctx, 1, n_vocab)[0], on_copy)


def test_kv_cache_seq_pos_max_is_a_sequences_last_position(lib, context):
    ctx, batch = context
    decode(lib, ctx, batch, 1, [10, 11, 12, 13, 14], start=3)
    assert lib.llama_kv_cache_seq_pos_max(ctx, 1) == 7


def test_get_logits_holds_a_row_per_wanted_position_in_batch_order(ik_target, lib, context):
    ctx, batch = context
    n_vocab = ik_target.model.config.vocab_size
    decode(lib, ctx, batch, 0, [10, 11])
    both = logits_of(lib, ctx, 2, n_vocab)
    lib.llama_kv_cache_seq_rm(ctx, 0, 1, -1)
    decode(lib, ctx, batch, 0, [11], start=1)
    assert torch.equal(logits_of(lib, ctx, 1, n_vocab)[0], both[1])
    assert not torch.equal(both[0], both[1])


def test_get_embeddings_gives_a_hidden_state_per_position_when_asked_for(ik_target, lib, context):
    ctx, batch = context
    hidden = ik_target.model.config.hidden_size
    lib.llama_set_embeddings(ctx, True)
    decode(lib, ctx, batch, 0, [10, 11])
    rows = lib.llama_get_embeddings(ctx)
    assert rows
    values = torch.tensor([rows[i] for i in range(2 * hidden)]).view(2, hidden)
    assert torch.isfinite(values).all() and not torch.equal(values[0], values[1])


def test_n_layer_and_n_ctx_train_read_the_file(ik_target, lib):
    assert lib.llama_n_layer(ik_target.model.model) == 30  # SmolLM2-135M
    assert lib.llama_n_ctx_train(ik_target.model.model) == 8192


def test_n_ctx_is_the_cells_the_context_was_made_with(lib, context):
    ctx, _ = context
    assert lib.llama_n_ctx(ctx) == 256


def test_model_meta_val_str_reads_a_key_and_fails_on_a_missing_one(ik_target, lib):
    buf = ctypes.create_string_buffer(64)
    assert lib.llama_model_meta_val_str(ik_target.model.model, b"general.architecture", buf, 64) > 0
    assert buf.value == b"llama"
    assert lib.llama_model_meta_val_str(ik_target.model.model, b"no.such.key", buf, 64) < 0


def test_vocab_eos_is_the_chat_end_token(ik_target, lib):
    assert lib.llama_vocab_eos(ik_target.model.vocab) == 2  # SmolLM2's <|im_end|>


def test_set_n_threads_keeps_the_logits(ik_target, lib, context):
    ctx, batch = context
    n_vocab = ik_target.model.config.vocab_size
    decode(lib, ctx, batch, 0, [10, 11])
    two = logits_of(lib, ctx, 2, n_vocab)
    lib.llama_kv_cache_clear(ctx)
    lib.llama_set_n_threads(ctx, 1, 1)
    decode(lib, ctx, batch, 0, [10, 11])
    assert torch.allclose(logits_of(lib, ctx, 2, n_vocab), two, atol=1e-3)


def test_print_system_info_names_the_cpu_features(lib):
    assert b"AVX2" in lib.llama_print_system_info()


def test_log_set_silences_loading(lib, capfd):
    load_model(None, backend="ik")
    assert "llama_model_loader" not in capfd.readouterr().err


# ---- exactness ---------------------------------------------------------------------------------
def _context(target, tokens: int = 200) -> list[int]:
    ids = target.tokenizer(" ".join(PROMPTS) * 8).input_ids
    return ids[:tokens]


def test_blocks_up_to_the_checked_length_give_the_one_token_logits(ik_target):
    """Every block of 1 to 16 tokens, scored after a prompt read in one call, gives each position
    the logits its 1-token pass gives (what lets plain steps be 1-token passes)."""
    from specdecode.runners import make_runner

    runner = make_runner(ik_target.model)
    ids = _context(ik_target)
    runner.forward(ids[:100], 0)
    one = torch.cat([runner.forward([t], 1) for t in ids[100:200]])  # [100, vocab]
    for size in range(1, min(16, ik_target.model.max_block) + 1):
        runner.truncate(100)
        got = torch.cat([runner.forward(ids[at:at + size], len(ids[at:at + size])) for at in range(100, 200, size)])
        assert torch.equal(got, one), size


def test_a_prompt_longer_than_the_checked_block_is_read_in_calls_that_stay_exact(ik_target):
    """A 200-token prompt read by ``forward`` gives the 1-token passes' logits at every position:
    the runner cuts it into calls of ``max_block`` tokens."""
    from specdecode.runners import make_runner

    runner = make_runner(ik_target.model)
    ids = _context(ik_target)
    one = torch.cat([runner.forward([t], 1) for t in ids])
    runner.reset()
    assert torch.equal(runner.forward(ids, len(ids)), one)


@pytest.mark.skipif(PROBE.exact_block >= MAX_BLOCK, reason="every pass length is exact on this machine")
def test_an_uncut_pass_past_the_checked_length_differs_here(ik_target):
    """Negative control for the test above, on a machine where the check found a limit: one call
    over the whole prompt gives other logits than the 1-token passes."""
    from specdecode.runners.ik import IkModel
    from specdecode.runners.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(IkModel(default_gguf_path(), max_block=MAX_BLOCK))
    ids = _context(ik_target)
    one = torch.cat([runner.forward([t], 1) for t in ids])
    runner.reset()
    assert not torch.equal(runner.forward(ids, len(ids)), one)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ngram_speculation_is_token_identical_to_plain_decoding(ik_target, prompt):
    from specdecode.drafters.base import NoDrafter
    from specdecode.drafters.ngram import NgramDrafter
    from specdecode.engine import SpeculativeDecoder

    config = GenerationConfig(max_new_tokens=64)
    plain = SpeculativeDecoder(ik_target.model, ik_target.tokenizer, NoDrafter()).generate(prompt, config)
    spec = SpeculativeDecoder(ik_target.model, ik_target.tokenizer, NgramDrafter()).generate(prompt, config)
    assert spec.token_ids == plain.token_ids
    if prompt.startswith("Repeat"):  # a prompt to copy from: drafts are accepted
        assert spec.stats.accepted > 0 and spec.stats.steps < plain.stats.steps


def test_a_seeded_sampled_generation_repeats_and_another_seed_differs(ik_target):
    from specdecode.drafters.ngram import NgramDrafter
    from specdecode.engine import SpeculativeDecoder

    dec = SpeculativeDecoder(ik_target.model, ik_target.tokenizer, NgramDrafter())
    config = GenerationConfig(max_new_tokens=32, temperature=0.8, seed=11)
    first, again = dec.generate(PROMPTS[2], config), dec.generate(PROMPTS[2], config)
    other = dec.generate(PROMPTS[2], config.with_(seed=12))
    assert first.token_ids == again.token_ids != other.token_ids


# ---- several sequences -------------------------------------------------------------------------
def _prompts(target, n: int) -> list[list[int]]:
    words = (" ".join(PROMPTS) * 6).split()
    return [target.tokenizer(" ".join(words[i:i + 3 + i])).input_ids for i in range(n)]


def _beside_others(runner, target, slot: int = 5):
    """Slot ``slot``'s logits over a prompt read and three decode steps, in a batch with 15 other
    slots reading prompts of other lengths at the same time and then decoding blocks of 1-5 tokens."""
    together, prompts = _all_beside_others(runner, target)
    return together[slot], prompts[slot]


def _all_beside_others(runner, target) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Every slot's logits in that batch, and its prompt."""
    prompts = _prompts(target, runner.slots)
    out = [runner.forward([Block(s, p, 1) for s, p in enumerate(prompts)])]
    for step in range(3):
        blocks = [Block(s, [100 + step] * (1 + (s + step) % 5), 1 + (s + step) % 5) for s in range(runner.slots)]
        out.append(runner.forward(blocks))
    return [torch.cat([rows[s] for rows in out]) for s in range(runner.slots)], prompts


def _alone(target, prompt: list[int], slot: int = 5) -> torch.Tensor:
    from specdecode.runners import make_runner

    runner = make_runner(target.model)
    out = [runner.forward(prompt, 1)]
    for step in range(3):
        n = 1 + (slot + step) % 5
        out.append(runner.forward([100 + step] * n, n))
    return torch.cat(out)


def test_a_sequence_gets_the_same_logits_alone_and_beside_15_others(ik_target):
    runner = ik_target.model.batch_runner(16, 512)
    together, prompt = _beside_others(runner, ik_target)
    assert torch.equal(together, _alone(ik_target, prompt))


def test_one_shared_context_for_all_slots_gives_other_logits(ik_target):
    """Negative control: why slots share a context only with a KV stream each (patch 0005,
    ``runners.ik.IkStreamBatchRunner``) and otherwise have one each (``IkBatchRunner``). The
    llama.cpp batch runner's one context over the fork's one pool gives some of the 16 sequences
    other logits than alone, even with every pass on one kernel (our build): their cells
    interleave in the pool."""
    from specdecode.runners.llamacpp_batch import LlamaCppBatchRunner

    runner = LlamaCppBatchRunner(ik_target.model, 16, 512)
    together, prompts = _all_beside_others(runner, ik_target)
    assert any(not torch.equal(rows, _alone(ik_target, prompt, slot)) for slot, (rows, prompt)
               in enumerate(zip(together, prompts)))


def _ngram_decoder(target):
    from specdecode.api import make_drafter
    from specdecode.engine import SpeculativeDecoder

    return SpeculativeDecoder(target.model, target.tokenizer, make_drafter("ngram", target))


def _together(dec, configs: list[GenerationConfig]) -> list[list[int]]:
    """Each of ``PROMPTS`` with its config, served together by a batch engine of 3 slots."""
    from specdecode.batching import BatchEngine

    engine = BatchEngine.for_decoder(dec, slots=3, slot_context=512)
    seqs = {engine.add(dec.encode(p), c).id: i for i, (p, c) in enumerate(zip(PROMPTS, configs))}
    together = [[] for _ in configs]
    while engine.running:
        for seq, event in engine.step():
            together[seqs[seq.id]] += event.token_ids
    return together


def test_the_batch_engine_on_ik_answers_as_a_request_alone(ik_target):
    """Greedy requests served together through the batch engine give what ``generate`` gives."""
    dec = _ngram_decoder(ik_target)
    config = GenerationConfig(max_new_tokens=40)
    alone = [dec.generate(p, config).token_ids for p in PROMPTS]
    assert _together(dec, [config] * len(PROMPTS)) == alone


def test_a_seeded_sampled_request_gets_the_same_tokens_from_generate_and_in_a_batch(ik_target):
    dec = _ngram_decoder(ik_target)
    sampled = GenerationConfig(max_new_tokens=32, temperature=0.8, seed=11, ignore_eos=True)
    alone = dec.generate(PROMPTS[1], sampled).token_ids
    configs = [GenerationConfig(max_new_tokens=20, temperature=0.7, seed=1), sampled,
               GenerationConfig(max_new_tokens=24)]
    assert _together(dec, configs)[1] == alone
    assert dec.generate(PROMPTS[1], sampled.with_(seed=12)).token_ids != alone  # the seed matters


# ---- choosing it -------------------------------------------------------------------------------
def test_auto_picks_ik_for_a_gguf_target_where_it_passes_its_check():
    assert resolve_backend("auto", None) == "ik"


def test_auto_falls_back_with_one_line_saying_why(monkeypatch, caplog):
    monkeypatch.setattr(ik_api, "probe", lambda gguf, cache=None: ik_api.Probe(False, "a planted failure"))
    with caplog.at_level(logging.WARNING):
        chosen = resolve_backend("auto", None)
    assert chosen in ("llamacpp", "torch")
    assert [r.getMessage() for r in caplog.records] == [f"backend auto: a planted failure; using {chosen}"]


def test_a_file_ik_cannot_load_gives_an_error_naming_it(tmp_path):
    from specdecode.runners.ik import IkModel

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(default_gguf_path().read_bytes()[:1 << 20])
    with pytest.raises(ConfigError, match="broken.gguf"):
        IkModel(bad, max_block=PROBE.exact_block)


# ---- the peer ----------------------------------------------------------------------------------
def test_the_ik_peer_decodes_as_our_plain_decoding_on_ik_beside_llamacpp(ik_target):
    """Its prompt read in calls of the checked length, ik's own plain decoding gives our plain
    decoding's tokens (with 512-token calls it would not, where the check found a limit)."""
    pytest.importorskip("llama_cpp")
    from specdecode.drafters.base import NoDrafter
    from specdecode.drafters.ngram import NgramDrafter
    from specdecode.engine import SpeculativeDecoder
    from specdecode.peers import make_peers

    prompt = ik_target.tokenizer(" ".join(PROMPTS) * 3).input_ids  # longer than a checked call
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    peers = make_peers("ik,llamacpp", ik_target, NgramDrafter(), threads=None)
    out = peers.run(prompt, config)
    assert {"ik", "llamacpp", "llamacpp_lookup"} <= set(out)
    assert [len(tokens) for tokens, _ in out.values()] == [12] * len(out)
    ours = SpeculativeDecoder(ik_target.model, ik_target.tokenizer, NoDrafter()).generate(prompt, config, chat=False)
    assert out["ik"][0] == ours.token_ids


@pytest.mark.parametrize("compare", ["ik,hf", "ik,ik", "vllm", ""])
def test_an_unknown_or_mixed_compare_list_is_refused_naming_compare(ik_target, compare):
    from specdecode.drafters.ngram import NgramDrafter
    from specdecode.peers import make_peers

    with pytest.raises(ConfigError, match="^compare: "):
        make_peers(compare, ik_target, NgramDrafter(), threads=None)
