"""The HTTP server, live on 127.0.0.1, reached with the official openai client and httpx."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

MODEL = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(max_queue: int):
    port = _free_port()
    cmd = [sys.executable, "-m", "specdecode", "serve", "--port", str(port), "--model-name", MODEL,
           "--max-queue", str(max_queue), "--draft", "ngram"]
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
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


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


def _metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(base + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def test_metrics_move_by_exactly_the_requests_tokens(server, client):
    base = server[0]
    names = ["vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
             "vllm:spec_decode_num_accepted_tokens_total"]
    before = {n: _metric(base, n) for n in names}
    pos0 = _metric(base, "vllm:spec_decode_num_accepted_tokens_per_pos_total", '{position="0"}')
    article = "Alice met Bob in Paris. Alice gave Bob a red book. Bob gave Alice a blue pen. "
    r = client.completions.create(
        model=MODEL, prompt="Repeat exactly: " + article * 3 + "\nRepeat: ", max_tokens=40, temperature=0
    )
    spec = r.model_extra["speculative_decoding"]
    assert spec["drafted_tokens"] > 0 and spec["accepted_tokens"] > 0
    after = {n: _metric(base, n) for n in names}
    assert after[names[1]] - before[names[1]] == spec["drafted_tokens"]
    assert after[names[2]] - before[names[2]] == spec["accepted_tokens"]
    assert after[names[0]] - before[names[0]] == spec["drafted_per_position"][0]
    assert (
        _metric(base, "vllm:spec_decode_num_accepted_tokens_per_pos_total", '{position="0"}') - pos0
        == spec["accepted_per_position"][0]
    )


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
    body = {"model": MODEL, "prompt": "Count from one to one thousand:", "max_tokens": 400, "temperature": 0,
            "stream": True, "speculative": {"draft_len": 0}}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break  # leave mid-stream: the connection closes
    time.sleep(0.5)
    t = time.perf_counter()
    r = httpx.post(
        base + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}, timeout=60
    )
    assert r.status_code == 200
    # 400 tokens would take ~20 s; a freed worker answers within a couple of target passes
    assert time.perf_counter() - t < 5
    assert _metric(base, "vllm:num_requests_running") == 0


def test_burst_past_queue_bound_gets_429_quickly():
    proc, base, _ = _start(max_queue=2)
    try:
        body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 64, "temperature": 0}

        def post(_):
            t = time.perf_counter()
            r = httpx.post(base + "/v1/completions", json=body, timeout=120)
            return r.status_code, time.perf_counter() - t

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(post, range(12)))
        rejected = [dt for code, dt in results if code == 429]
        assert {code for code, _ in results} <= {200, 429}
        assert len(rejected) >= 12 - 3 - 2  # 1 running + 2 queued, allowing for timing at the edges
        assert max(rejected) < 2.0
    finally:
        proc.terminate()
        proc.wait(10)
