"""Reading an OpenAI completions or chat completions request: every field checked, errors as
HTTP 400 naming the field."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULTS, MAX_LOGPROBS, GenerationConfig, SpecDecodeError
from ..engine import SpeculativeDecoder

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_MAX_TOKENS = 512  # chat requests without a limit get at most this many (or what the context has room for)
MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI allows
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit integer, as OpenAI and vLLM take it

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                 "stream_options", "n", "speculative", "logprobs", "ignore_eos"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# fields that do not change what is generated: accepted and not used
INERT_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# features this server does not have, accepted only at the value that turns them off; any other
# value is refused with 400 naming the field (never silently ignored)
OFF_VALUES: dict[str, tuple] = {
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "echo": (False,), "suffix": ("",), "best_of": (1,),
    "min_tokens": (0,), "modalities": (["text"],), "prediction": (),
}


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

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
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)  # 8.0 is the integer 8 (JSON Schema's integer; pydantic's ints, as vLLM reads them)
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


FALLBACK_TOKEN_CHARS = 256  # characters per token assumed for a tokenizer that lists no vocabulary
MAX_INT_DIGITS = 64  # an integer in a request body longer than this is no count, seed or token id anyone means


class HugeInt:
    """An integer of more than ``MAX_INT_DIGITS`` digits in a request body, not converted: Python
    refuses to convert one of thousands (``sys.set_int_max_str_digits``), and none is a value any
    field allows, so the field that holds it gets the usual 400 naming it."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def parse_int(text: str):
    """``json.loads``'s ``parse_int``: an int, or a ``HugeInt`` for one too long to be meant."""
    return int(text) if len(text) <= MAX_INT_DIGITS else HugeInt(text)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(body: dict, chat: bool) -> None:
    known = (CHAT_FIELDS if chat else COMPLETION_FIELDS) | INERT_FIELDS
    for name, value in body.items():
        if name in known or value is None:
            continue
        if name not in OFF_VALUES:
            raise RequestError(400, f"unrecognized request argument '{name}'", name)
        off = OFF_VALUES[name]
        if not any(type(value) is type(v) and value == v for v in off):
            allowed = " or ".join(repr(v) for v in off) if off else "null"
            raise RequestError(400, f"'{name}' is not supported by this server; it may only be {allowed} "
                                    f"(got {value!r})", name)


def _text(value, where: str) -> str:
    """A string that can be encoded (a lone UTF-16 surrogate cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"{where} contains text that is not valid Unicode (a lone surrogate)",
                           where.split("[")[0]) from None
    return value


def _content(message: dict, i: int) -> str:
    """A message's content as text: a string, a list of text parts, or null (an assistant turn)."""
    content = message.get("content")
    if content is None:
        if message.get("role") == "assistant":
            return ""
        raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
    if isinstance(content, str):
        return _text(content, f"messages[{i}].content")
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": ...}} "
                                        "(this server reads text only)", "messages")
            parts.append(_text(part["text"], f"messages[{i}].content"))
        return "".join(parts)
    raise RequestError(400, f"messages[{i}].content must be a string or a non-empty list of text parts", "messages")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise RequestError(400, f"messages[{i}] needs a role: system, developer, user or assistant", "messages")
        if m.get("tool_calls") or m.get("function_call"):
            raise RequestError(400, f"messages[{i}]: tool calls are not supported by this server", "messages")
        out.append({"role": ROLES[m["role"]], "content": _content(m, i)})
    if not any(m["content"].strip() for m in out):
        raise RequestError(400, "'messages' must hold some non-empty content", "messages")
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token to report, or None for no log-probabilities."""
    if chat:
        wanted = body.get("logprobs")
        if wanted is None:
            wanted = False
        if not isinstance(wanted, bool):
            raise RequestError(400, f"'logprobs' must be true or false (got {wanted!r})", "logprobs")
        top = _number(body, "top_logprobs", 0, low=0, high=MAX_LOGPROBS, integer=True)
        if top and not wanted:
            raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return top if wanted else None
    if body.get("logprobs") is None:
        return None
    return _number(body, "logprobs", None, low=0, high=MAX_COMPLETION_LOGPROBS, integer=True)


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` decodes to (its longest vocabulary entry:
    a byte-level or SentencePiece entry has a character per byte or more), so that a text of
    more than ``context * max_token_chars`` characters is known to overflow the context before
    it is tokenized."""
    try:
        return max(1, max(len(token) for token in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return FALLBACK_TOKEN_CHARS


def _check_length(texts: list[str], limit: int | None, field: str) -> None:
    """400 naming ``field`` where the texts are longer than ``limit`` characters (None: no limit),
    before any tokenizing: a megabyte of one word would hold the tokenizer, and the GIL with it."""
    chars = sum(len(text) for text in texts)
    if limit is not None and chars > limit:
        raise RequestError(400, f"'{field}' of {chars} characters cannot fit in this server's context "
                                f"(at most {limit} characters)", field)


def parse_request(body, chat: bool, decoder: SpeculativeDecoder, model_name: str,
                  defaults: GenerationConfig = DEFAULTS, max_context: int | None = None,
                  max_chars: int | None = None) -> ParsedRequest:
    """A completions (``chat`` false) or chat completions request body -> what to generate;
    RequestError (400) naming the field otherwise. ``max_context``: the tokens one request may
    hold (the model's context, or a batch slot's); ``max_chars``: the longest text that could fit
    in it (``max_token_chars``), refused before it is tokenized."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    _check_fields(body, chat)
    model = body.get("model")
    if model not in (None, model_name):
        raise RequestError(400, f"model '{model}' does not exist; this server serves '{model_name}'",
                           "model", "model_not_found")
    if _number(body, "n", 1, integer=True) != 1:
        raise RequestError(400, "'n' must be 1: one choice per request", "n")
    dec = decoder
    context = max_context or dec.max_context
    try:
        if chat:
            messages = _messages(body)
            _check_length([m["content"] for m in messages], max_chars, "messages")
            prompt_ids = dec.encode(messages, chat=True)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
                if any(t < 0 or t >= dec.vocab_size for t in prompt):
                    raise RequestError(400, f"'prompt' token ids must be in [0, {dec.vocab_size})", "prompt")
                prompt_ids = list(prompt)
            elif isinstance(prompt, str) and prompt.strip():
                _check_length([prompt], max_chars, "prompt")
                prompt_ids = dec.encode(_text(prompt, "prompt"), chat=False)
            else:
                raise RequestError(400, "'prompt' must be a non-empty string (or one string, or token ids)", "prompt")
    except SpecDecodeError as exc:
        raise RequestError(400, exc.message, exc.param) from None

    default_max = COMPLETION_MAX_TOKENS if not chat else max(1, min(CHAT_MAX_TOKENS, context - len(prompt_ids)))
    name, max_tokens = "max_tokens", body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:  # the newer name wins where both are given
        name, max_tokens = "max_completion_tokens", body["max_completion_tokens"]
    max_tokens = _number({name: max_tokens}, name, default_max, low=1, integer=True)
    temperature = _number(body, "temperature", 1.0, low=0, high=2)
    top_p = _number(body, "top_p", 1.0, low=0, high=1, low_open=True)
    top_k = _number(body, "top_k", 0, low=-1, integer=True)
    seed = body.get("seed")
    if seed is not None:  # a negative seed names another stream of randomness, as any 64-bit value does
        seed = _number(body, "seed", None, low=SEED_RANGE[0], high=SEED_RANGE[1], integer=True) % 2**64
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stop = [_text(s, "stop") for s in stop]
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool) \
            or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise RequestError(400, "'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    if body.get("stream_options") is not None and not stream:
        raise RequestError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = options.get("include_usage", False)
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is None:
        ignore_eos = False
    if not isinstance(ignore_eos, bool):
        raise RequestError(400, "'ignore_eos' must be true or false", "ignore_eos")
    if context and len(prompt_ids) + max_tokens > context:
        raise RequestError(400, f"prompt ({len(prompt_ids)} tokens) plus {name} ({max_tokens}) exceeds the "
                           f"{context} tokens a request may hold", name, "context_length_exceeded")
    spec = body.get("speculative")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict) or set(spec) - {"draft_len", "policy", "tree"}:
        raise RequestError(400, "'speculative' must be an object with draft_len, policy and/or tree", "speculative")
    if "draft_len" in spec:
        spec = {**spec, "draft_len": _number(spec, "draft_len", defaults.draft_len, integer=True)}  # range: config
    try:
        config = GenerationConfig(
            max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
            top_k=max(0, top_k), seed=seed, stop=tuple(stop), ignore_eos=ignore_eos,
            draft_len=spec.get("draft_len", defaults.draft_len),
            policy=spec.get("policy", defaults.policy), tree=spec.get("tree", defaults.tree),
            logprobs=_logprobs(body, chat),
        ).validate()
    except SpecDecodeError as exc:
        raise RequestError(400, exc.message, exc.param) from None
    return ParsedRequest(prompt_ids, config, stream, include_usage)
