"""Reading an OpenAI completions or chat completions request: every field checked, errors as
HTTP 400 naming the field."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULTS, GenerationConfig, SpecDecodeError
from ..engine import SpeculativeDecoder

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_MAX_TOKENS = 512  # chat requests without a limit get at most this many (or what the context has room for)
MAX_STOP_STRINGS = 4  # as OpenAI allows


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ParsedRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def _number(body: dict, name: str, default, low=None, high=None, low_open=False, integer=False):
    value = body.get(name, default)
    if value is None:
        value = default
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "" if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(x for x in (lo, hi) if x)
        raise RequestError(400, f"'{name}' must be {kind}{' ' + allowed if allowed else ''} (got {value!r})", name)
    return value


def parse_request(body, chat: bool, decoder: SpeculativeDecoder, model_name: str,
                  defaults: GenerationConfig = DEFAULTS) -> ParsedRequest:
    """A completions (``chat`` false) or chat completions request body -> what to generate;
    RequestError (400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if model not in (None, model_name):
        raise RequestError(400, f"model '{model}' does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
    if _number(body, "n", 1, integer=True) != 1:
        raise RequestError(400, "'n' must be 1: one choice per request", "n")
    dec = decoder
    try:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m["content"].strip() \
                        or m.get("role") not in ("system", "user", "assistant"):
                    raise RequestError(400, "each message needs a role (system, user, assistant) and non-empty "
                                       "string content", "messages")
            prompt_ids = dec.encode([{"role": m["role"], "content": m["content"]} for m in messages], chat=True)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            ):
                if any(t < 0 or t >= dec.vocab_size for t in prompt):
                    raise RequestError(400, f"'prompt' token ids must be in [0, {dec.vocab_size})", "prompt")
                prompt_ids = list(prompt)
            elif isinstance(prompt, str) and prompt.strip():
                prompt_ids = dec.encode(prompt, chat=False)
            else:
                raise RequestError(400, "'prompt' must be a non-empty string (or one string, or token ids)", "prompt")
    except SpecDecodeError as exc:
        raise RequestError(400, exc.message, exc.param) from None

    default_max = COMPLETION_MAX_TOKENS if not chat else max(1, min(CHAT_MAX_TOKENS, dec.max_context - len(prompt_ids)))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    name = "max_tokens" if not chat or "max_completion_tokens" not in body else "max_completion_tokens"
    max_tokens = _number({name: max_tokens}, name, default_max, low=1, integer=True)
    temperature = _number(body, "temperature", 1.0, low=0, high=2)
    top_p = _number(body, "top_p", 1.0, low=0, high=1, low_open=True)
    top_k = _number(body, "top_k", 0, low=-1, integer=True)
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", None, low=0, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if dec.max_context and len(prompt_ids) + max_tokens > dec.max_context:
        raise RequestError(400, f"prompt ({len(prompt_ids)} tokens) plus {name} ({max_tokens}) exceeds the "
                           f"model's context of {dec.max_context} tokens", name, "context_length_exceeded")
    spec = body.get("speculative", {}) if isinstance(body.get("speculative"), dict) else {}
    try:
        config = GenerationConfig(
            max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
            top_k=max(0, top_k), seed=seed, stop=tuple(stop),
            draft_len=spec.get("draft_len", defaults.draft_len),
            policy=spec.get("policy", defaults.policy), tree=spec.get("tree", defaults.tree),
        ).validate()
    except SpecDecodeError as exc:
        raise RequestError(400, exc.message, exc.param) from None
    return ParsedRequest(prompt_ids, config, stream, include_usage)
