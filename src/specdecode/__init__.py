"""specdecode: lossless speculative decoding for Hugging Face causal LMs.

Implements speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling"): a cheap drafter proposes tokens, the target verifies them in one pass, and
the acceptance rule keeps the output distribution exactly the target's.
"""

from .api import load, make_drafter
from .config import ConfigError, GenerationConfig, SpecDecodeError
from .engine import GenerationResult, SpeculativeDecoder, StreamEvent
from .stats import RunStats, StepRecord

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
