"""specdecode: lossless speculative decoding of language models (Hugging Face causal LMs, and GGUF
files run by ik_llama.cpp or llama.cpp): a library, a command-line tool and an OpenAI-compatible server.

Implements speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"): a cheap drafter proposes tokens, the target verifies them in one pass, and
the acceptance rule keeps the output distribution exactly the target's.
"""

import importlib

from .config import ConfigError, GenerationConfig, SpecDecodeError
from .stats import RunStats, StepRecord

# imported on first use: they import torch (seconds on a small CPU), which the command line's
# parsing, --help and its subcommands that run no model do not need
_LAZY = {"load": "api", "make_drafter": "api", "GenerationResult": "engine", "SpeculativeDecoder": "engine",
         "StreamEvent": "engine"}

__all__ = [
    "ConfigError",
    "GenerationConfig",
    "GenerationResult",
    "RunStats",
    "SpecDecodeError",
    "SpeculativeDecoder",
    "StepRecord",
    "StreamEvent",
    "load",
    "make_drafter",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
