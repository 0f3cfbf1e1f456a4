"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions`` as the OpenAPI schema
FastAPI serves (``/openapi.json``) describes them: every field ``requests.parse_request`` reads,
with its range, the fields that change nothing (``requests.INERT_FIELDS``), and the features this
server does not have, each at the one value that turns it off (``requests.OFF_VALUES``). A body
the schema allows is served; one it does not gets a 400 naming the field. The routes read the raw
body themselves (so that every refusal is ours and names its field): the schema documents them
and is what schema-driven fuzzing (schemathesis) generates requests from."""

from __future__ import annotations

from ..config import MAX_DRAFT_LEN, MAX_LOGPROBS, POLICIES
from .requests import INERT_FIELDS, MAX_COMPLETION_LOGPROBS, MAX_STOP_STRINGS, OFF_VALUES, ROLES, SEED_RANGE

TEXT = {"type": "string", "minLength": 1}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _common(max_tokens: int | None) -> dict:
    count = {"type": "integer", "minimum": 1, **({"maximum": max_tokens} if max_tokens else {})}
    return {
        "model": {"type": "string", "description": "the name the server was started with (--model-name)"},
        "max_tokens": _nullable(count),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": -1, "description": "0 or -1: off"}),
        "seed": _nullable({"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]}),
        "stop": _nullable({"anyOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1,
                                            "maxItems": MAX_STOP_STRINGS}]}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                                     "additionalProperties": False,
                                     "description": "only with stream: true"}),
        "n": _nullable({"type": "integer", "enum": [1]}),
        "ignore_eos": _nullable({"type": "boolean"}),
        "speculative": _nullable({
            "type": "object", "additionalProperties": False,
            "description": "this server's extension: how requests are drafted",
            "properties": {"draft_len": {"type": "integer", "minimum": 0, "maximum": MAX_DRAFT_LEN},
                           "policy": {"type": "string", "enum": list(POLICIES),
                                      "description": "how tau is chosen; in a pass shared with other requests, "
                                                     "cost requests are planned by the verification budget"},
                           "tree": {"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["auto"]}]}}}),
        **{name: {"description": "accepted, changes nothing"} for name in sorted(INERT_FIELDS)},
        **{name: {"enum": [list(v) if isinstance(v, list) else v for v in values] + [None],
                  "description": "not offered: only the value that turns it off"}
           for name, values in OFF_VALUES.items()},
    }


def completion_body(max_tokens: int | None = None) -> dict:
    """JSON Schema of a /v1/completions body (``max_tokens``: the largest count to describe, None:
    the context decides)."""
    fields = _common(max_tokens)
    fields["prompt"] = {"anyOf": [TEXT, {"type": "array", "items": TEXT, "minItems": 1, "maxItems": 1},
                                  {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}],
                        "description": "a string, a list of one string, or token ids"}
    fields["logprobs"] = _nullable({"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS})
    return {"type": "object", "required": ["prompt"], "properties": fields, "additionalProperties": False}


def chat_body(max_tokens: int | None = None) -> dict:
    """JSON Schema of a /v1/chat/completions body."""
    fields = _common(max_tokens)
    part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": list(ROLES)},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": part, "minItems": 1},
                              {"type": "null", "description": "an assistant turn only"}]}}}
    fields["messages"] = {"type": "array", "items": message, "minItems": 1}
    fields["max_completion_tokens"] = fields["max_tokens"]
    fields["logprobs"] = _nullable({"type": "boolean"})
    fields["top_logprobs"] = _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                        "description": "with logprobs: true"})
    return {"type": "object", "required": ["messages"], "properties": fields, "additionalProperties": False}


def openapi_body(schema: dict) -> dict:
    """``openapi_extra`` for a route whose body ``schema`` describes."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
