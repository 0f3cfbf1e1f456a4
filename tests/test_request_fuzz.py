"""The request parser under generated bodies (hypothesis): whatever JSON a client sends, it either
becomes a request or a 400 that names the field, never another exception (which the server would
answer with a 500)."""

from __future__ import annotations

import json
import os

import pytest

from specdecode.server.requests import CHAT_FIELDS, COMPLETION_FIELDS, OFF_VALUES, RequestError, parse_request

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

# generated bodies per endpoint: a few hundred in the test suite (seconds); a longer run:
# SPECDECODE_FUZZ_EXAMPLES=10000 python -m pytest tests/test_request_fuzz.py
FUZZ_EXAMPLES = int(os.environ.get("SPECDECODE_FUZZ_EXAMPLES", "300"))


class FakeDecoder:
    """What the parser reads of a decoder: a tokenizer's ``encode`` (a token per character,
    chat messages joined), the vocabulary and the context."""

    vocab_size = 1000
    max_context = 256

    def encode(self, prompt, chat: bool = True) -> list[int]:
        if isinstance(prompt, list):
            prompt = "".join(m["content"] for m in prompt)
        return [ord(c) % self.vocab_size for c in prompt] or [0]


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "tool", 3]), values)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=30), values)}),
                    max_size=3)


def bodies(fields: set[str]):
    known = sorted(fields | set(OFF_VALUES))
    return st.dictionaries(st.one_of(st.sampled_from(known), st.text(max_size=10)),
                           st.one_of(values, messages), max_size=8)


def _parse(body, chat: bool):
    body = json.loads(json.dumps(body))  # what a server reads: JSON (NaN included, as Python's json)
    try:
        return parse_request(body, chat, FakeDecoder(), "m", max_chars=10_000)
    except RequestError as exc:
        assert exc.status == 400, exc.message
        assert exc.message
        assert exc.param is not None or not isinstance(body, dict), exc.message
        return exc


@pytest.mark.parametrize("chat, fields", [(True, CHAT_FIELDS), (False, COMPLETION_FIELDS)], ids=["chat", "completion"])
def test_any_generated_body_is_a_request_or_a_400_naming_a_field(chat, fields):
    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(bodies(fields))
    def check(body):
        _parse(body, chat)

    check()


def test_a_well_formed_body_among_them_parses():
    parsed = _parse({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}, True)
    assert not isinstance(parsed, RequestError) and parsed.config.max_new_tokens == 3


@pytest.mark.parametrize("role", [[], {}, ["user"]])
def test_a_role_that_is_no_string_is_a_400_naming_messages(role):
    """Found by the schema fuzz: a list as a role was looked up in a dict (TypeError, a 500)."""
    error = _parse({"messages": [{"role": role, "content": "Hi"}]}, True)
    assert isinstance(error, RequestError) and error.param == "messages"
