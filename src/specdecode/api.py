"""Load once, generate many times.

    import specdecode
    dec = specdecode.load(draft="ngram")               # default target: SmolLM2-135M-Instruct
    result = dec.generate("Summarise: ...", specdecode.GenerationConfig(max_new_tokens=64))
    for event in dec.stream("Tell me a story"):        # text as it is accepted
        print(event.text, end="", flush=True)
"""

from __future__ import annotations

from pathlib import Path

from .config import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_DRAFT, DEFAULT_DTYPE, ConfigError
from .drafters.base import Drafter, NoDrafter
from .drafters.head_file import SHIPPED_HEAD
from .drafters.model import ModelDrafter, check_same_vocabulary
from .drafters.ngram import HybridDrafter, NgramDrafter
from .engine import SpeculativeDecoder
from .models import gguf_file, load_model
from .runners import is_torch, output_rows, runs_lean

BUILTIN_DRAFTERS = ("none", "ngram", "head", "head+ngram")


def auto_drafter(target, fast: bool = True) -> str:
    """What ``--draft auto`` means for this target: the shipped head with n-gram lookup where the
    head was trained for it and the lean runner it reads features from applies, else n-gram."""
    from .drafters.head_file import draft_config, trained_for

    fits = runs_lean(target.model, fast) and trained_for(draft_config(SHIPPED_HEAD), target.model)
    return "head+ngram" if fits else "ngram"


def load(target: str | None = None, draft: str = DEFAULT_DRAFT, *, dtype: str = DEFAULT_DTYPE,
         device: str = DEFAULT_DEVICE, fast: bool = True, backend: str = DEFAULT_BACKEND,
         threads: int | None = None) -> SpeculativeDecoder:
    """Load a target (hub id, local directory, GGUF file, or None for the default) and a drafter:
    ``"none"`` (plain decoding), ``"ngram"`` (prompt lookup), ``"head"`` (the shipped draft head of
    the default target), ``"head+ngram"`` (the head, or a long n-gram match when there is one),
    ``"auto"`` (``auto_drafter``: head+ngram on the default target on torch, n-gram otherwise) or a draft
    model's id/path (a trained head's directory too), either followed by ``+ngram`` to prefer a long
    n-gram match when there is one. ``backend``: ``"torch"``, ``"llamacpp"`` or ``"ik"`` (a GGUF file
    in its own quantization through llama.cpp or ik_llama.cpp, on ``threads`` threads) or
    ``"auto"`` (``models.resolve_backend``).
    ``fast=False`` runs the Hugging Face modules instead of the lean Llama forward."""
    loaded = load_model(target, param="target", dtype=dtype, device=device, backend=backend, threads=threads)
    drafter = make_drafter(draft, loaded, dtype=dtype, device=device, fast=fast)
    return SpeculativeDecoder(loaded.model, loaded.tokenizer, drafter, fast=fast)


def make_drafter(spec: str, target, *, dtype: str = DEFAULT_DTYPE, device: str = DEFAULT_DEVICE,
                 fast: bool = True) -> Drafter:
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            "draft", f"must be auto, none, ngram, head, head+ngram or a model id/path [+ngram] (got {spec!r})"
        )
    from .drafters.head_file import is_feature_draft, load_feature_draft

    if spec == "auto":
        spec = auto_drafter(target, fast)
    if spec.endswith("+ngram") and not Path(spec).exists():  # X+ngram: a long n-gram match, else X's draft
        base = spec[: -len("+ngram")]
        if base in ("", "none", "ngram", "auto") or base.endswith("+ngram"):
            raise ConfigError(
                "draft", f"+ngram follows head, a trained head's directory or a draft model (got {spec!r})"
            )
        return HybridDrafter(make_drafter(base, target, dtype=dtype, device=device, fast=fast))
    if spec == "head":
        spec = str(SHIPPED_HEAD)
    if spec == "none":
        return NoDrafter()
    if spec == "ngram":
        return NgramDrafter()

    if is_feature_draft(spec):
        if not is_torch(target.model):
            raise ConfigError("draft", "a draft head reads the target's features, which needs the torch backend "
                                       "(--backend torch); on llamacpp and ik use none, ngram or a draft model's "
                                       ".gguf file")
        return load_feature_draft(spec, target.model)
    if is_torch(target.model) or gguf_file(spec, "draft") is None:
        loaded = load_model(spec, param="draft", dtype=dtype, device=device)
    else:  # a GGUF draft for a llama.cpp target runs there too, with the target's threads
        loaded = load_model(spec, param="draft", backend=target.model.backend, threads=target.model.threads)
    check_same_vocabulary(target.tokenizer, loaded.tokenizer)
    vocab = min(output_rows(target.model), len(target.tokenizer))
    return ModelDrafter(loaded.model, vocab_size=vocab, name=f"model:{spec}", fast=fast)
