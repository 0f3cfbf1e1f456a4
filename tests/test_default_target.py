"""On the real default target (SmolLM2-135M-Instruct): greedy speculative output is token-identical
to plain decoding, and seeded sampling is reproducible."""

from __future__ import annotations

import pytest

from specdecode import GenerationConfig
from specdecode.drafters.base import NoDrafter
from specdecode.drafters.ngram import NgramDrafter
from specdecode.engine import SpeculativeDecoder

ARTICLE = (
    "The city council voted on Tuesday to approve a new budget for public transport. The budget includes "
    "funding for three new bus lines, the renovation of the central station, and a pilot program for free "
    "fares for students. Critics argued that the costs were too high."
)
PROMPTS = [
    "Summarize the following article in two sentences:\n" + ARTICLE,
    "Write a haiku about the sea.",
    "List the first five prime numbers and explain why each is prime.",
]


@pytest.fixture(scope="module")
def plain_outputs(default_target):
    dec = SpeculativeDecoder(default_target.model, default_target.tokenizer, NoDrafter())
    cfg = GenerationConfig(max_new_tokens=48)
    return {p: dec.generate(p, cfg).token_ids for p in PROMPTS}


@pytest.mark.parametrize("policy, tau", [("fixed", 1), ("fixed", 4), ("fixed", 8), ("cost", 8), ("heuristic", 4)])
def test_ngram_greedy_identical_on_default_target(default_target, plain_outputs, policy, tau):
    dec = SpeculativeDecoder(default_target.model, default_target.tokenizer, NgramDrafter())
    cfg = GenerationConfig(max_new_tokens=48, draft_len=tau, policy=policy)
    accepted = 0
    for prompt in PROMPTS:
        got = dec.generate(prompt, cfg)
        assert got.token_ids == plain_outputs[prompt], prompt
        accepted += got.stats.accepted
    assert accepted > 0


def test_seeded_sampling_reproducible_on_default_target(default_target):
    dec = SpeculativeDecoder(default_target.model, default_target.tokenizer, NgramDrafter())
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.7, top_p=0.9, seed=5)
    assert dec.generate(PROMPTS[0], cfg).token_ids == dec.generate(PROMPTS[0], cfg).token_ids
