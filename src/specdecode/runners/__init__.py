"""Runners: one model and its KV cache behind the ``Runner`` protocol (``base``).

* ``hf.HFRunner``: any Hugging Face causal LM, through its own module;
* ``lean.LeanRunner``: Llama-family models through ``llama.LeanLlama``, a lean forward tuned for
  this machine (``tuning``), with tree passes and feature capture.

``make_runner`` picks the fastest one that computes a model exactly.
"""

from __future__ import annotations

import weakref

import torch

from ..models import cache_dir
from .base import FeatureRunner, Runner, TreeRunner, common_prefix
from .hf import HFRunner
from .lean import LeanRunner
from .llama import LeanLlama, supports

__all__ = ["FeatureRunner", "HFRunner", "LeanLlama", "LeanRunner", "Runner", "TreeRunner", "common_prefix",
           "lean_model", "make_runner", "runs_lean"]

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


def runs_lean(model: torch.nn.Module, fast: bool = True) -> bool:
    """Whether ``make_runner`` gives this model the lean runner."""
    return fast and supports(model)


def make_runner(model: torch.nn.Module, vocab_size: int | None = None, fast: bool = True) -> Runner:
    """The fastest runner that computes this model exactly: the lean Llama forward where it
    supports the architecture, else the Hugging Face module itself."""
    if runs_lean(model, fast):
        return LeanRunner(lean_model(model), vocab_size=vocab_size)
    return HFRunner(model, vocab_size=vocab_size)
