"""The llama.cpp backend: the default target's GGUF file in its own quantization, greedy output
identical to plain decoding through the same kernels, rollback equal to a fresh prefill."""

from __future__ import annotations

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.config import ConfigError

llama_cpp = pytest.importorskip("llama_cpp")

from specdecode.api import load, make_drafter  # noqa: E402
from specdecode.check import run_check  # noqa: E402
from specdecode.drafters.base import NoDrafter  # noqa: E402
from specdecode.drafters.ngram import NgramDrafter  # noqa: E402
from specdecode.engine import SpeculativeDecoder  # noqa: E402
from specdecode.models import load_model  # noqa: E402
from specdecode.runners import LlamaCppRunner, make_runner  # noqa: E402

from conftest import CHAT_PROMPTS  # noqa: E402

PROMPTS = CHAT_PROMPTS


@pytest.fixture(scope="module")
def gguf_target():
    return load_model(None, backend="llamacpp")


def _greedy_run(runner: LlamaCppRunner, prompt: list[int], n: int) -> list[int]:
    runner.reset()
    runner.forward(prompt[:-1], 0)
    seq = [prompt[-1]]
    for _ in range(n):
        seq.append(int(runner.forward(seq[-1:], 1)[0].argmax()))
    return seq


def _one_token_and_block_logits(model, tokenizer, blocks=(2, 3, 5, 8, 33, 70)):
    """Logits of 80 greedy tokens after a 250-token prompt (the cache view passes 512 cells) from
    1-token passes, and from the same tokens in blocks of each size; the prompt read in one call."""
    runner = make_runner(model, vocab_size=len(tokenizer))
    assert isinstance(runner, LlamaCppRunner)
    prompt = (tokenizer(PROMPTS[2]).input_ids * 40)[:250]
    n = 80
    seq = _greedy_run(runner, prompt, n)
    runner.reset()
    runner.forward(prompt[:-1], 0)
    single = torch.cat([runner.forward([t], 1) for t in seq[:-1]])  # [n, vocab]
    out = {}
    for block in blocks:
        runner.reset()
        runner.forward(prompt[:-1], 0)
        out[block] = torch.cat([runner.forward(seq[i:min(i + block, n)], len(seq[i:min(i + block, n)]))
                                for i in range(0, n, block)])
    return single, out


def test_a_one_token_pass_gives_the_logits_of_a_block_at_every_position(gguf_target):
    """Plain decoding's 1-token passes give, at every position, the logits the same token gets
    inside a verification block of any size (70: llama.cpp's tiled attention for f16 keys), also
    past the context length where its 1-token attention splits f16 keys between threads."""
    single, blocks = _one_token_and_block_logits(gguf_target.model, gguf_target.tokenizer)
    for block, logits in blocks.items():
        assert torch.equal(logits, single), block


def test_with_f16_keys_a_one_token_pass_leaves_the_blocks_path(gguf_target):
    """Control for the test above: with llama.cpp's default f16 keys the same comparison fails,
    which is why keys are cached as Q8_0 (runners.llamacpp)."""
    model = gguf_target.model
    model.key_type = "GGML_TYPE_F16"
    try:
        single, blocks = _one_token_and_block_logits(model, gguf_target.tokenizer, blocks=(2, 70))
    finally:
        model.key_type = "GGML_TYPE_Q8_0"
    assert not torch.equal(blocks[2], single)  # the split 1-token path
    assert not torch.equal(blocks[70], blocks[2])  # the tiled path


def test_rollback_leaves_what_a_fresh_prefill_gives(gguf_target):
    runner = make_runner(gguf_target.model)
    ids = gguf_target.tokenizer(PROMPTS[0]).input_ids
    runner.forward(ids, 0)
    runner.forward([100, 200, 300, 400], 4)  # a rejected block
    runner.truncate(len(ids))
    after = runner.forward([500, 600], 2)
    fresh = make_runner(gguf_target.model)
    fresh.forward(ids, 0)
    assert torch.equal(after, fresh.forward([500, 600], 2))
    assert runner.cached == fresh.cached == ids + [500, 600]


@pytest.mark.parametrize("draft_len", [1, 3, 8])
def test_greedy_ngram_identical_to_plain_decoding(gguf_target, draft_len):
    model, tok = gguf_target.model, gguf_target.tokenizer
    cfg = GenerationConfig(max_new_tokens=48, draft_len=draft_len, policy="fixed", ignore_eos=True)
    plain = SpeculativeDecoder(model, tok, NoDrafter())
    spec = SpeculativeDecoder(model, tok, NgramDrafter())
    drafted = 0
    for prompt in PROMPTS:
        want = plain.generate(prompt, cfg)
        got = spec.generate(prompt, cfg)
        assert got.token_ids == want.token_ids, prompt
        drafted += got.stats.drafted
    assert drafted > 0


def test_a_gguf_draft_model_runs_on_llamacpp_and_agrees_with_itself(gguf_target):
    """The target's own file as the draft: every drafted token is accepted, output unchanged."""
    drafter = make_drafter(str(gguf_target.model.path), gguf_target)
    dec = SpeculativeDecoder(gguf_target.model, gguf_target.tokenizer, drafter)
    cfg = GenerationConfig(max_new_tokens=24, draft_len=4, policy="fixed", ignore_eos=True)
    got = dec.generate(PROMPTS[1], cfg)
    want = SpeculativeDecoder(gguf_target.model, gguf_target.tokenizer, NoDrafter()).generate(PROMPTS[1], cfg)
    assert got.token_ids == want.token_ids
    assert got.stats.drafted > 0 and got.stats.accepted == got.stats.drafted


def test_check_passes_on_llamacpp():
    spec = load(None, "ngram", backend="llamacpp")
    assert run_check(spec, GenerationConfig(max_new_tokens=32), progress=False)["passed"]


@pytest.mark.parametrize("kwargs,param", [
    ({"target": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "target"),  # not a GGUF file
    ({"dtype": "bfloat16"}, "dtype"),
    ({"device": "cuda"}, "device"),
    ({"threads": 0}, "threads"),
    ({"draft": "head"}, "draft"),  # the head reads torch features
])
def test_what_llamacpp_cannot_do_is_refused_naming_the_option(kwargs, param):
    kwargs = {"target": None, "draft": "ngram", **kwargs}
    with pytest.raises(ConfigError) as err:
        load(kwargs.pop("target"), kwargs.pop("draft"), backend="llamacpp", **kwargs)
    assert err.value.param == param


def test_generate_and_bench_on_llamacpp_from_the_command_line(capsys, tmp_path):
    import json

    from specdecode.cli import main

    assert main(["generate", "Name three colours.", "--backend", "llamacpp", "--json", "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) > 0
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["Repeat: one two three one two three"]}))
    out = tmp_path / "bench"
    argv = ["bench", "--dataset", str(data), "--backend", "llamacpp", "--draft", "ngram", "--compare", "llamacpp",
            "--max-new-tokens", "16", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "vs llamacpp" in table and "vs llamacpp_lookup" in table
    overall = json.loads((out / "results.json").read_text())["overall"]
    assert overall["greedy_match"] is True and overall["ratio_vs_llamacpp"] > 0
    # whether llama.cpp's own decoding matched ours is counted (summarize's test checks the count)
    assert isinstance(overall["llamacpp_identical_to_plain"], int)


def test_sampling_on_llamacpp_keeps_the_targets_distribution():
    """Seeded sampling with n-gram drafts: the first two tokens' distribution is the target's own
    (chi-square at a Bonferroni-split 1e-3; the wrong rules that fail it are in test_check)."""
    spec = load(None, "ngram", backend="llamacpp")
    # fixed blocks: drafts are sent whatever the cost policy would decide on this machine's curve
    config = GenerationConfig(temperature=0.8, top_p=0.95, policy="fixed", draft_len=4)
    prompt = ["Repeat the following list exactly: red, green, blue, red, green, blue, red, green,"]
    report = run_check(spec, config, prompt, draws=300, alpha=1e-3, progress=False)
    assert report["passed"], report
    assert report["contexts"][0]["accepted"] > 0  # drafts were accepted, so the rule was exercised


def test_weights_stay_out_of_amx_buffers_where_llama_cpp_was_built_with_amx():
    # its AMX buffers crash the first pass on Sapphire Rapids hosts (llama.cpp #20824)
    from specdecode.runners.llamacpp import extra_buffers, high_level_defaults

    class Lib:
        def __init__(self, info):
            self.info = info

        def llama_print_system_info(self):
            return self.info

    assert extra_buffers(Lib(b"AVX2 = 1 | FMA = 1 | REPACK = 1 |"))
    assert not extra_buffers(Lib(b"AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"))
    import llama_cpp.llama_cpp as bindings

    with high_level_defaults():
        inside = bindings.llama_model_default_params()
    assert inside.use_extra_bufts == extra_buffers(bindings)
    assert bindings.llama_model_default_params().use_extra_bufts  # restored: llama.cpp's own default
