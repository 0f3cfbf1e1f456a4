"""Runners: one model and its KV cache behind the ``Runner`` protocol (``base``).

* ``hf.HFRunner``: any Hugging Face causal LM, through its own module;
* ``lean.LeanRunner``: Llama-family models through ``llama.LeanLlama``, a lean forward tuned for
  this machine (``tuning``), with tree passes and feature capture;
* ``llamacpp.LlamaCppRunner``: a GGUF file through llama.cpp, in its own quantization.

``make_runner`` picks the runner for a loaded model: llama.cpp's for a ``LlamaCppModel``, else the
fastest one that computes the torch module exactly.
"""

from __future__ import annotations

import weakref

import torch

from ..models import cache_dir
from .base import FeatureRunner, Runner, TreeRunner, common_prefix
from .hf import HFRunner
from .lean import LeanRunner
from .llama import LeanLlama, supports
from .llamacpp import LlamaCppModel, LlamaCppRunner

__all__ = ["FeatureRunner", "HFRunner", "LeanLlama", "LeanRunner", "LlamaCppModel", "LlamaCppRunner", "Runner",
           "TreeRunner", "common_prefix", "describe_engine", "is_torch", "lean_model", "make_runner", "output_rows",
           "runs_lean"]

# one lean copy per model, so that a drafter and a decoder over it share the weights; kept apart from
# the model (not as an attribute) so that a deep copy of the model does not carry the original's
_LEAN: weakref.WeakKeyDictionary[torch.nn.Module, LeanLlama] = weakref.WeakKeyDictionary()


def lean_model(model: torch.nn.Module) -> LeanLlama:
    """The model's ``LeanLlama``, built on first use (tuned for this machine)."""
    built = _LEAN.get(model)
    if built is None:
        built = LeanLlama(model, tuning_cache=cache_dir() / "layout-tuning.json")
        _LEAN[model] = built
    return built


def is_torch(model) -> bool:
    """Whether ``model`` is a torch module (the torch backend), whose weights and layers code may read."""
    return isinstance(model, torch.nn.Module)


def output_rows(model) -> int:
    """How many logits a pass of ``model`` gives per position (its output vocabulary, padding included)."""
    return model.config.vocab_size if not is_torch(model) else model.get_output_embeddings().weight.shape[0]


def runs_lean(model, fast: bool = True) -> bool:
    """Whether ``make_runner`` gives this model the lean runner."""
    return fast and is_torch(model) and supports(model)


def make_runner(model, vocab_size: int | None = None, fast: bool = True) -> Runner:
    """The runner for ``model``: llama.cpp's for a ``LlamaCppModel``; for a torch module, the lean
    Llama forward where it supports the architecture, else the Hugging Face module itself."""
    if isinstance(model, LlamaCppModel):
        return LlamaCppRunner(model, vocab_size=vocab_size)
    if runs_lean(model, fast):
        return LeanRunner(lean_model(model), vocab_size=vocab_size)
    return HFRunner(model, vocab_size=vocab_size)


def describe_engine(model) -> str:
    """One line naming what runs ``model``: the library build for a GGUF file (ik_llama.cpp's says
    its source and our patches, ``ik_api.describe``), torch's version otherwise."""
    if getattr(model, "backend", None) == "ik":
        from .ik_api import describe

        return describe()
    if isinstance(model, LlamaCppModel):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"llama.cpp: llama-cpp-python {version('llama-cpp-python')}"
        except PackageNotFoundError:
            return "llama.cpp"
    return f"torch {torch.__version__}"
