"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis): request bodies generated from the
schema FastAPI serves, those it allows and those it does not, sent to the app in process (the
default target loaded, 4 slots). Properties, for every generated request: no 5xx; a 400 about a
JSON object names its field; the request leaves no running slot and no queue place behind; and the
server still answers a normal request as before. A few hundred in the suite (a minute); a longer
run: SPECDECODE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_schema_fuzz.py"""

from __future__ import annotations

import os

import pytest

from specdecode.server.schema import chat_body, completion_body

from conftest import until

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

FUZZ_EXAMPLES = int(os.environ.get("SPECDECODE_FUZZ_EXAMPLES", "100"))  # per operation and mode
MAX_TOKENS = 4  # what a generated request may ask for: thousands of them run in minutes
MODEL = "m"
PROBE = {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def served():
    from starlette.testclient import TestClient

    from specdecode.api import load
    from specdecode.server.app import Server, create_app

    server = Server(lambda: load(None, "ngram"), MODEL, max_batch=4, slot_context=512)
    server.load()
    app = create_app(server)
    client = TestClient(app)  # no lifespan: the server is loaded already
    answer = client.post("/v1/completions", json=PROBE).json()["choices"][0]["text"]
    yield server, app, client, answer
    server.worker.stop(5.0)


@pytest.fixture(scope="module")
def api(served):
    """The served schema with generated requests' token counts capped at ``MAX_TOKENS``."""
    _, app, client, _ = served
    raw = client.get("/openapi.json").json()
    for path, body in (("/v1/completions", completion_body), ("/v1/chat/completions", chat_body)):
        raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] = body(MAX_TOKENS)
    loaded = schemathesis.openapi.from_dict(raw)
    loaded.app = _without_lifespan(app)
    return loaded


def _without_lifespan(app):
    """``app`` with its lifespan answered and not run: schemathesis opens a client per request,
    whose closing would run the app's shutdown (which stops the worker) after every one."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    return wrapped


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_generated_request_gets_an_answer_or_a_400_naming_its_field(api, served, path, mode):
    server, _, client, answer = served
    operation = next(op.ok() for op in api.get_all_operations() if op.ok().path == path)

    def gauge(name: str) -> float:
        return server.metrics.registry.get_sample_value(name, {"model_name": MODEL})

    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(operation.as_strategy(schemathesis.GenerationMode(mode)))
    def check(case):
        response = case.call(timeout=120)  # the bound of a wait on the server, not what is tested
        assert response.status_code < 500, response.text
        if response.status_code == 400 and isinstance(case.body, dict):
            error = response.json()["error"]
            assert error["message"] and error["param"] is not None, error  # a field may be named ""
        if mode == "positive":  # what the schema allows is served
            assert response.status_code == 200 or _refused_by_range(response), (case.body, response.text)
        until(lambda: gauge("vllm:num_requests_running") == 0 and gauge("vllm:num_requests_waiting") == 0,
              "no slot or queue place left behind")
        assert client.post("/v1/completions", json=PROBE).json()["choices"][0]["text"] == answer

    check()


def _refused_by_range(response) -> bool:
    """A 400 the schema cannot express: values allowed one by one that do not go together (a
    prompt longer than the slot, top_logprobs without logprobs, stream_options without stream, an
    empty chat, a token id past the vocabulary, another model's name)."""
    return response.status_code == 400 and response.json()["error"]["param"] in {
        "max_tokens", "max_completion_tokens", "top_logprobs", "stream_options", "messages", "prompt", "model"}
