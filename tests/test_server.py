"""The HTTP server, live on 127.0.0.1, reached with the official openai client and httpx."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from specdecode.config import POLICIES
from specdecode.procs import free_port

from conftest import json_post_head, raw_request, read_until_closed, until

openai = pytest.importorskip("openai")

MODEL = "smollm2"


def _start(max_queue: int, max_batch: int | None = None, *extra: str):
    port = free_port()
    cmd = [sys.executable, "-m", "specdecode", "serve", "--port", str(port), "--model-name", MODEL,
           "--max-queue", str(max_queue), "--draft", "ngram", *extra]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    saw_loading = False
    while time.time() < deadline:
        try:
            r = httpx.get(base + "/health", timeout=2)
            if r.status_code == 200:
                return proc, base, saw_loading
            saw_loading |= r.status_code == 503
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become healthy")


@pytest.fixture(scope="module")
def server():
    proc, base, saw_loading = _start(max_queue=64)
    yield base, saw_loading
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    # retries as the official client's default: a kept-alive connection the server closes after
    # its idle timeout (uvicorn: 5 s, e.g. while another test's server runs) just as a request
    # reuses it is a client-side race, seen once in a full run; the tests here check answers
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=2, timeout=120)


def test_health_models_and_loading_state(server, client):
    assert server[1], "/health should answer 503 while the model loads"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_stream_equals_non_stream_and_cli(server, client):
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
    )
    assert full.choices[0].text == streamed
    assert full.usage.completion_tokens > 0
    cli = subprocess.run([sys.executable, "-m", "specdecode", "generate", prompt, "--no-chat", "--json",
                          "--max-new-tokens", "24"], capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout)["text"] == full.choices[0].text
    spec = full.model_extra["speculative_decoding"]
    assert spec["target_passes"] >= 1 and "acceptance_rate" in spec


def test_chat_stream_equals_non_stream_and_cli(client):
    msg = "Summarize in one sentence: The council approved three new bus lines and free fares for students."
    full = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": msg}], max_tokens=40, temperature=0
    )
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": msg}],
                                                 max_tokens=40, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == streamed
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    cli = subprocess.run([sys.executable, "-m", "specdecode", "generate", msg, "--json", "--max-new-tokens", "40"],
                         capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout)["text"] == streamed


def _metric(base: str, name: str, absent: float | None = None, **labels: str) -> float:
    """The value of the one series ``name`` with these labels and this server's ``model_name``;
    a missing series fails the test unless ``absent`` says what it stands for (a labelled counter
    not yet incremented), so that no assertion passes by finding nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {"model_name": MODEL, **labels}
    found = [sample.value for family in text_string_to_metric_families(httpx.get(base + "/metrics").text)
             for sample in family.samples if sample.name == name and sample.labels == want]
    if not found and absent is not None:
        return absent
    assert len(found) == 1, f"{name}{want}: {len(found)} series"
    return found[0]


def test_metrics_move_by_exactly_the_requests_tokens(server, client):
    base = server[0]
    names = ["vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
             "vllm:spec_decode_num_accepted_tokens_total"]
    before = {n: _metric(base, n) for n in names}
    pos0 = _metric(base, "vllm:spec_decode_num_accepted_tokens_per_pos_total", absent=0.0, position="0")
    article = "Alice met Bob in Paris. Alice gave Bob a red book. Bob gave Alice a blue pen. "
    r = client.completions.create(
        model=MODEL, prompt="Repeat exactly: " + article * 3 + "\nRepeat: ", max_tokens=40, temperature=0,
        extra_body={"speculative": {"policy": "fixed", "draft_len": 4}},  # drafts whatever the budget says
    )
    spec = r.model_extra["speculative_decoding"]
    assert spec["drafted_tokens"] > 0 and spec["accepted_tokens"] > 0
    after = {n: _metric(base, n) for n in names}
    assert after[names[1]] - before[names[1]] == spec["drafted_tokens"]
    assert after[names[2]] - before[names[2]] == spec["accepted_tokens"]
    assert after[names[0]] - before[names[0]] == spec["drafted_per_position"][0]
    assert (
        _metric(base, "vllm:spec_decode_num_accepted_tokens_per_pos_total", absent=0.0, position="0") - pos0
        == spec["accepted_per_position"][0]
    )


def test_every_policy_is_served_by_name_and_gives_the_greedy_answer(client):
    prompt = "Repeat exactly: red, green, blue, red, green, blue, yellow, red, green, blue."
    answers = {}
    for policy in POLICIES:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"speculative": {"policy": policy}})
        assert r.model_extra["speculative_decoding"]["policy"] == policy
        answers[policy] = r.choices[0].text
    assert len(set(answers.values())) == 1 and answers["cost"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 9000}, "max_tokens"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "model"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "speculative": {"tree": "yes"}}, "tree"),
        ("/v1/completions", None, None),  # malformed JSON
    ],
)
def test_bad_requests_get_400_and_server_keeps_serving(server, path, body, param):
    base = server[0]
    content = b"{not json" if body is None else json.dumps(body).encode()
    r = httpx.post(base + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    ok = httpx.post(
        base + "/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0},
        timeout=60,
    )
    assert ok.status_code == 200


def test_concurrent_requests_match_sequential_results(server, client):
    prompts = [f"Write one sentence about the number {i}." for i in range(32)]

    def ask(p):
        t = time.perf_counter()
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        return r.choices[0].text, time.perf_counter() - t

    sequential = [ask(p)[0] for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        concurrent_results = list(pool.map(ask, prompts))
    assert [text for text, _ in concurrent_results] == sequential


def test_disconnect_mid_stream_frees_the_worker(server):
    base = server[0]
    body = {"model": MODEL, "prompt": "Count from one to one thousand:", "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True, "speculative": {"draft_len": 0}}
    before = _metric(base, "vllm:generation_tokens_total")
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leave mid-stream: the connection closes
    until(lambda: _metric(base, "vllm:num_requests_running") == 0, "the request left behind stops")
    assert _metric(base, "vllm:generation_tokens_total") - before < 2000  # cut at the hang-up, not run out
    r = httpx.post(
        base + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}, timeout=60
    )
    assert r.status_code == 200


def test_burst_past_queue_bound_gets_429_quickly():
    proc, base, _ = _start(max_queue=2, max_batch=1)
    try:
        body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 256, "temperature": 0,
                "ignore_eos": True}

        def post(_):
            r = httpx.post(base + "/v1/completions", json=body, timeout=120)
            return r.status_code, time.perf_counter()  # when the answer came, to order the answers

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(post, range(12)))
        rejected = [at for code, at in results if code == 429]
        assert {code for code, _ in results} <= {200, 429}
        assert len(rejected) >= 12 - 3 - 2  # 1 running + 2 queued, allowing for timing at the edges
        # refused on arrival: every 429 came before the first request had its 256 tokens
        assert max(rejected) < min(at for code, at in results if code == 200)
    finally:
        proc.terminate()
        proc.wait(10)


# ---- many users at once ---------------------------------------------------------------------------
def test_sixteen_concurrent_streams_each_match_their_answer_alone(server, client):
    questions = [f"Name a fruit that starts with the letter {chr(65 + i)}." for i in range(16)]
    alone = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24,
                                            temperature=0).choices[0].message.content for q in questions]

    def stream(q):
        chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                max_tokens=24, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(stream, questions)) == alone


def test_requests_run_together_and_the_gauge_shows_the_batch(server):
    base = server[0]
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 600, "temperature": 0, "ignore_eos": True,
            "stream": True}
    streaming = threading.Barrier(5)  # four streams that have their first chunk, and this test

    def stream():
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            streaming.wait(60)
            return r.status_code, sum(1 for _ in lines)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream) for _ in range(4)]
        streaming.wait(60)
        running = _metric(base, "vllm:num_requests_running")  # each has streamed, none has had its 600 tokens
        assert all(f.result()[0] == 200 for f in futures)
    assert running == 4  # in one batch, not one after another
    assert _metric(base, "vllm:num_requests_running") == 0


def test_a_non_streaming_client_that_times_out_frees_its_slot_at_once(server):
    base = server[0]
    impatient = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=1.0)
    before = _metric(base, "vllm:generation_tokens_total")
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="Count from one to one thousand:", max_tokens=3000,
                                     temperature=0, extra_body={"ignore_eos": True})
    until(lambda: _metric(base, "vllm:num_requests_running") == 0, "the abandoned request stops")
    assert _metric(base, "vllm:generation_tokens_total") - before < 3000  # cut at the hang-up, not run out


def test_logprobs_are_plain_decodings(server, client):
    from specdecode import GenerationConfig
    from specdecode.api import load

    msg = "Name three colours."
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": msg}], max_tokens=12,
                                       temperature=0, logprobs=True, top_logprobs=3)
    got = r.choices[0].logprobs.content
    plain = load(None, "none")  # the server's backend: auto
    want = plain.generate(msg, GenerationConfig(max_new_tokens=12, logprobs=3))
    events = list(plain.stream(msg, GenerationConfig(max_new_tokens=12, logprobs=3)))
    lps = [lp for e in events for lp in e.logprobs]
    assert len(got) == len(want.token_ids) == len(lps)
    for entry, lp in zip(got, lps):
        assert entry.logprob == pytest.approx(lp.logprob, abs=1e-6)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in lp.top], abs=1e-6)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
    done = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    assert len(done.choices[0].logprobs.token_logprobs) == 4 and len(done.choices[0].logprobs.top_logprobs[0]) == 2


def test_loadtest_resends_a_request_whose_connection_closed_unanswered(tmp_path):
    import asyncio

    from specdecode import loadtest

    settings = loadtest.LoadSettings({"x": "http://127.0.0.1:1"}, str(tmp_path / "q.jsonl"))
    stream = (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
              b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\ndata: [DONE]\n\n')

    def run(closed_times):
        calls = []

        def handler(request):
            calls.append(request)
            if len(calls) <= closed_times:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
            return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

        async def go():
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
                return await loadtest._one(client, "http://127.0.0.1:1", "m", "p", settings)

        return asyncio.run(go()), len(calls)

    result, calls = run(1)
    assert result.ok and result.tokens == 1 and result.retries == 1 and calls == 2
    result, calls = run(5)  # a server that never answers: given up after the retries, a failure
    assert not result.ok and result.retries == loadtest.RETRIES and calls == loadtest.RETRIES + 1
    assert "RemoteProtocolError" in result.error


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"frobnicate": 1}, "frobnicate"),
    ({"seed": 2**64}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
])
def test_what_the_server_cannot_do_is_refused_naming_the_field(server, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    r = httpx.post(server[0] + "/v1/chat/completions", content=json.dumps(body).encode(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
])
def test_completion_features_not_offered_are_refused(server, path, extra, param):
    r = httpx.post(server[0] + path, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, **extra}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [
    b'{"model": "smollm2", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",  # an integer of 5,000 digits
    b"[" * 100000 + b"]" * 100000,  # nested 100,000 deep
    b'{"prompt": "\xff\xfe"}',  # not UTF-8
])
def test_malformed_bodies_get_a_json_400_and_keep_the_connection(server, raw):
    with httpx.Client(base_url=server[0], timeout=30) as http:
        r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"]
        assert http.get("/health").status_code == 200  # same client, the connection kept


def test_an_integer_of_thousands_of_digits_is_refused_naming_its_field(server):
    raw = b'{"model": "smollm2", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"
    r = httpx.post(server[0] + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "max_tokens" and "5000 digits" in error["message"]
    assert "set_int_max_str_digits" not in error["message"]


def test_stream_options_without_streaming_is_refused_naming_it(server):
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": False,
        "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("path, field", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_a_text_too_long_for_any_tokenizing_to_fit_is_refused_by_its_length(server, path, field):
    word = "x" * 1_000_000  # one "word" of a megabyte: slow to tokenize, and longer than the context can hold
    body = {"prompt": word} if field == "prompt" else {"messages": [{"role": "user", "content": word}]}
    r = httpx.post(server[0] + path, json={"model": MODEL, "max_tokens": 1, **body}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == field and "1000000 characters" in error["message"]


def test_every_vllm_series_carries_the_model_name(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    samples = [sample for family in text_string_to_metric_families(httpx.get(server[0] + "/metrics").text)
               for sample in family.samples if sample.name.startswith("vllm:")]
    assert len({sample.name for sample in samples}) >= 10
    assert {sample.labels.get("model_name") for sample in samples} == {MODEL}


def test_a_stalled_body_gets_408_and_its_socket_closed_while_others_are_served():
    proc, base, _ = _start(8, None, "--body-timeout", "1", "--keep-alive-timeout", "1")
    try:
        body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
        stalled = [raw_request(base, json_post_head("/v1/completions", body) + body[:10])
                   for _ in range(20)]  # headers and part of the body
        assert httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"},
                          timeout=60).status_code == 200
        for sock in stalled:
            answer = read_until_closed(sock)  # the server answers, then closes the socket
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert _metric(base, "specdecode:request_failed_total", status="408") == 20
        # an idle kept-alive connection is closed too
        answer = read_until_closed(raw_request(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 200")
        assert _metric(base, "vllm:num_requests_running") == 0 and _metric(base, "vllm:num_requests_waiting") == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_huge_body_is_refused_without_stalling_the_server(server):
    base = server[0]
    big = json.dumps({"model": MODEL, "prompt": "word " * 1_000_000, "max_tokens": 1}).encode()  # 5 MB
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        posted = pool.submit(httpx.post, base + "/v1/completions", content=big,
                             headers={"content-type": "application/json"}, timeout=60)
        assert httpx.get(base + "/health", timeout=10).status_code == 200  # how fast: scripts/health_during.py
        assert posted.result().status_code == 413


def test_what_openai_and_vllm_accept_is_accepted(server):
    cases = [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]},
        {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
                      {"role": "user", "content": "Again"}]},
        {"messages": [{"role": "user", "content": "Hi"}], "stream": None, "logit_bias": None, "tools": None,
         "presence_penalty": 0, "response_format": {"type": "text"}, "user": "u1", "seed": -5},
    ]
    for extra in cases:
        r = httpx.post(server[0] + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, **extra}, timeout=60)
        assert r.status_code == 200, (extra, r.text)


def test_max_tokens_applies_when_max_completion_tokens_is_null(server):
    r = httpx.post(server[0] + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 5,
        "max_completion_tokens": None, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_queue_places_are_freed_by_clients_who_leave_and_429_says_when_to_retry():
    proc, base, _ = _start(1, 1, "--queue-timeout", "3")
    try:
        # 4,000 tokens: far longer than the 1 s a client waits below plus the 3 s wait limit
        long = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 4000, "temperature": 0,
                "ignore_eos": True, "speculative": {"draft_len": 0}}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, base + "/v1/completions", json=long, timeout=120)  # the one slot
            until(lambda: _metric(base, "vllm:num_requests_running") == 1, "the long request runs")
            with pytest.raises(httpx.TimeoutException):  # queued behind it, then gives up
                httpx.post(base + "/v1/completions", json={**long, "max_tokens": 2}, timeout=1.0)
            until(lambda: _metric(base, "vllm:num_requests_waiting") == 0, "the client who left frees its place")
            full = pool.submit(httpx.post, base + "/v1/completions", json={**long, "max_tokens": 2}, timeout=30)
            until(lambda: _metric(base, "vllm:num_requests_waiting") == 1, "a request takes the one place")
            r = httpx.post(base + "/v1/completions", json={**long, "max_tokens": 2}, timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # the one place is taken
            queued_too_long = full.result()
            assert queued_too_long.status_code == 429 and "retry-after" in queued_too_long.headers  # waited 3 s
            assert not running.done()  # the wait limit, not the long request's end, sent it away
            proc.terminate()  # the long request is cut within the shutdown grace, not waited for
    finally:
        proc.terminate()
        proc.wait(10)


def test_shutdown_cuts_a_running_stream_at_its_grace_period_and_exits():
    proc, base, _ = _start(8, None, "--shutdown-grace", "1")
    body = {"model": MODEL, "prompt": "Count to ten thousand:", "max_tokens": 4000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        proc.terminate()
        rest = list(lines)
    assert proc.wait(60) in (0, -15)  # it exits (uvicorn ends by raising the SIGTERM it handled again)
    # cut, not waited for: an error event instead of the 4,000th token
    assert any(line.startswith('data: {"error"') for line in rest)
    assert len([line for line in rest if line.startswith('data: {"id"')]) < 4000


def test_sigterm_gives_queued_requests_503_and_cuts_running_streams_with_a_503_event():
    proc, base, _ = _start(8, 1, "--shutdown-grace", "1")
    try:
        body = {"model": MODEL, "prompt": "Count to ten thousand:", "max_tokens": 3000, "temperature": 0,
                "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(1) as pool, \
                httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)  # the running request has its first chunk
            queued = pool.submit(httpx.post, base + "/v1/completions", json=body, timeout=120)
            for _ in range(2400):  # until the second request waits for the one slot
                if _metric(base, "vllm:num_requests_waiting") == 1:
                    break
                time.sleep(0.05)
            proc.terminate()
            refused = queued.result()
            rest = list(lines)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        errors = [json.loads(line[6:]) for line in rest if line.startswith('data: {"error"')]
        assert errors and "cut short" in errors[0]["error"]["message"]
        assert proc.wait(60) is not None
    finally:
        if proc.poll() is None:
            proc.kill()


def test_loadtest_reports_every_load_and_writes_its_plot(server, tmp_path):
    from specdecode.loadtest import LoadSettings, run_loadtest, write_results

    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [f"Say the word {w}."]})
                              for i, w in enumerate(["cat", "dog", "sun"])))
    result = run_loadtest(LoadSettings({"ours": server[0]}, str(data), (1, 3), requests=3, max_tokens=6),
                          progress=False)
    assert [(r["concurrency"], r["requests"], r["failed"]) for r in result["rows"]] == [(1, 3, 0), (3, 3, 0)]
    for row in result["rows"]:
        assert row["output_tokens"] == 18 and row["throughput_tok_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] <= row["e2e_p95_s"] and row["tpot_p50_s"] > 0
    assert all(p.stat().st_size > 0 for p in write_results(result, str(tmp_path / "out")))


def test_loadtest_rounds_interleave_servers_on_fresh_prompts_and_report_medians(tmp_path, monkeypatch):
    from specdecode import loadtest

    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [f"q{i}"]}) for i in range(100)))
    calls, speed = [], {"a": [10.0, 30.0, 20.0, 12.0, 14.0, 16.0], "b": [5.0, 6.0, 7.0, 50.0, 1.0, 2.0]}

    warmups = []

    async def fake_load(url, model, prompts, settings, concurrency, progress):
        name = url.rsplit(":", 1)[1]
        if settings.max_tokens < 128:  # the unmeasured warm-up request
            warmups.append(name)
            return [], 1.0
        calls.append((name, concurrency, tuple(prompts)))
        tokens = speed[name].pop(0)  # tokens in one second of wall time: the round's throughput
        return [loadtest.RequestResult(True, int(tokens), 0.1, 1.0)], 1.0

    monkeypatch.setattr(loadtest, "_load", fake_load)
    settings = loadtest.LoadSettings({"A": "http://127.0.0.1:a", "B": "http://127.0.0.1:b"}, str(data), (1, 4),
                                     requests=5, rounds=3, model="m")
    result = loadtest.run_loadtest(settings, progress=False)
    assert warmups == ["a", "b"]  # one short request each before anything is measured
    # each round visits every server, the first one rotating; both get the same prompts in a round
    assert [(c[0], c[1]) for c in calls] == [("a", 1), ("b", 1), ("b", 1), ("a", 1), ("a", 1), ("b", 1),
                                             ("a", 4), ("b", 4), ("b", 4), ("a", 4), ("a", 4), ("b", 4)]
    rounds = [c[2] for c in calls[::2]]
    assert all(calls[2 * i][2] == calls[2 * i + 1][2] for i in range(6))
    assert len({p for r in rounds for p in r}) == 6 * 5  # no prompt sent in two rounds or two loads
    rows = {(r["server"], r["concurrency"]): r for r in result["rows"]}
    assert rows["A", 1]["throughput_tok_s"] == 20.0 and rows["A", 1]["throughput_range"] == [10.0, 30.0]
    assert rows["B", 1]["throughput_tok_s"] == 6.0 and rows["B", 4]["throughput_tok_s"] == 2.0
    assert rows["A", 4]["requests"] == 3 and len(rows["A", 4]["rounds"]) == 3
    assert "median (range) of 3 rounds" in loadtest.format_table(result) and "| 20.0 (10-30) |" in \
        loadtest.format_table(result)


@pytest.mark.parametrize("extra, param", [
    (["--url", "x=http://127.0.0.1:9", "--serve-args=--draft none"], "--serve-args"),
    (["--url", "x=http://127.0.0.1:9", "--serve", "x=--draft none"], "--serve:"),
    (["--serve", "x=", "--serve", "x=--draft none"], "--serve:"),
    (["--serve", "no-options-given"], "--serve:"),
    (["--url", "x=http://127.0.0.1:9", "--rounds", "0"], "--rounds:"),
    (["--llama-server", "x=/nonexistent/llama-server -np 4"], "--llama-server:"),
    (["--llama-server", "x="], "--llama-server:"),
    (["--serve", "x=", "--llama-server", "x=ik"], "--serve:"),
])
def test_loadtest_refuses_conflicting_servers_naming_the_option(tmp_path, capsys, extra, param):
    from specdecode.cli import main

    code = main(["loadtest", "--dataset", str(tmp_path / "q.jsonl"), *extra])
    assert code == 2 and param in capsys.readouterr().err


def test_loadtest_sends_to_loopback_only(tmp_path):
    from specdecode.cli import main

    code = main(["loadtest", "--dataset", str(tmp_path / "q.jsonl"), "--url", "x=http://10.0.0.1:8000"])
    assert code == 2


def test_loadtest_reports_a_server_it_started_that_exits(tmp_path, capsys):
    from specdecode.cli import main

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["Hi"]}))
    code = main(["loadtest", "--dataset", str(data), "--serve-args=--no-such-option", "--no-progress"])
    assert code == 2 and "specdecode serve exited with code 2" in capsys.readouterr().err


def test_serve_refuses_batching_it_cannot_do_naming_the_option():
    from specdecode.models import default_gguf_path

    # a draft model brings a runner of its own: it cannot be copied per request
    cmd = [sys.executable, "-m", "specdecode", "serve", "--port", str(free_port()), "--backend", "torch",
           "--draft", str(default_gguf_path()), "--max-batch", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--max-batch" in proc.stderr


def test_loading_runs_on_a_thread_that_has_ended_and_raises_its_error():
    # a live thread that ran passes keeps an OpenMP team, which slows every later pass of the
    # worker (Server.load's docstring); Ray Serve calls load on a thread it keeps
    from specdecode.server.app import Server

    ran_on = []

    def loader():
        ran_on.append(threading.current_thread())
        raise RuntimeError("no such model")

    with pytest.raises(RuntimeError, match="no such model"):
        Server(loader, "m").load()
    assert ran_on[0] is not threading.current_thread() and not ran_on[0].is_alive()


@pytest.mark.parametrize("option, value", [("max_queue", 0), ("max_batch", 65), ("slot_context", 8),
                                           ("queue_timeout", 0), ("body_timeout", -1.0), ("shutdown_grace", "5")])
def test_the_library_server_refuses_limits_out_of_range_naming_them(option, value):
    """The limits are checked where the library takes them, before anything loads (the CLI only
    translates the error)."""
    from specdecode.config import ConfigError
    from specdecode.server.app import Server

    def loader():
        raise AssertionError("nothing loads with a bad limit")

    with pytest.raises(ConfigError) as err:
        Server(loader, "m", **{option: value})
    assert err.value.param == option


def test_serve_on_port_0_says_the_port_it_listens_on():
    proc = subprocess.Popen([sys.executable, "-m", "specdecode", "serve", "--port", "0", "--draft", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # printed once the socket is bound
        port = int(line.rsplit(":", 1)[1])
        assert line.startswith("specdecode: serving ") and port > 0
        until(lambda: _answers(f"http://127.0.0.1:{port}/health"), "the server to answer on the port it printed")
    finally:
        proc.terminate()
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.TransportError:
        return False
