"""The server as Ray Serve replicas: pure parts, then `serve --ray` itself, then a local two-node
cluster on 127.0.0.1 with two replicas of the default target (one per node)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from specdecode.procs import free_port
from specdecode.server.metrics import Metrics
from specdecode.server.ray_serve import (
    DEPLOYMENT,
    ROUTER,
    SNAPSHOT_METRIC,
    MetricsBoard,
    RayOptions,
    default_threads,
    deployment_options,
    http_options,
    local_only_environment,
    merge_metrics,
)

from conftest import json_post_head, raw_request, read_until_closed, until

local_only_environment()  # before Ray is imported anywhere in this process
ray = pytest.importorskip("ray")
pytest.importorskip("llama_cpp")

MODEL = "smollm2"
PROMPT = "The three primary colors are"


def _samples(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels.get("replica"): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name}


# ---- pure parts ---------------------------------------------------------------------------
def test_merged_metrics_label_every_sample_with_its_replica():
    a, b = Metrics(), Metrics()
    a.generation_tokens.inc(3)
    b.generation_tokens.inc(5)
    b.running.set(2)
    text = merge_metrics({"a": list(a.registry.collect()), "b": list(b.registry.collect())}).decode()
    assert _samples(text, "vllm:generation_tokens_total") == {"a": 3.0, "b": 5.0}
    assert _samples(text, "vllm:num_requests_running") == {"a": 0.0, "b": 2.0}
    assert text.count("# TYPE vllm:generation_tokens_total counter") == 1  # one family, two series


def test_the_board_drops_a_replica_that_stopped_pushing(monkeypatch):
    from specdecode.server import ray_serve

    now = [100.0]
    monkeypatch.setattr(ray_serve.time, "monotonic", lambda: now[0])
    board, m = MetricsBoard(), Metrics()
    board.push("gone", list(m.registry.collect()))
    now[0] += ray_serve.METRICS_STALE_S - 1
    board.push("alive", list(m.registry.collect()))
    assert set(_samples(board.render().decode(), "vllm:generation_tokens_total")) == {"gone", "alive"}
    now[0] += 2
    assert set(_samples(board.render().decode(), "vllm:generation_tokens_total")) == {"alive"}


@pytest.mark.parametrize("options, param", [
    (RayOptions(replicas=2, min_replicas=1, max_replicas=3), "replicas"),
    (RayOptions(min_replicas=1), "min_replicas"),
    (RayOptions(min_replicas=3, max_replicas=2), "min_replicas"),
    (RayOptions(replicas=0), "replicas"),
    (RayOptions(threads=0), "threads"),
    (RayOptions(min_replicas=-1, max_replicas=2), "min_replicas"),
])
def test_ray_options_are_checked_naming_the_option(options, param):
    from specdecode.config import SpecDecodeError

    with pytest.raises(SpecDecodeError) as err:
        options.validate()
    assert err.value.param == param


def test_replicas_share_this_machines_cores_and_take_a_node_each_on_a_cluster():
    assert default_threads(RayOptions(replicas=2), [2]) == 1
    assert default_threads(RayOptions(replicas=1), [2]) == 2
    assert default_threads(RayOptions(min_replicas=1, max_replicas=4), [8]) == 2  # room for the most
    assert default_threads(RayOptions(replicas=3), [2]) == 1
    assert default_threads(RayOptions(replicas=4, address="auto"), [16, 8]) == 8
    assert default_threads(RayOptions(replicas=2, threads=3), [2]) == 3


def test_autoscaling_aims_at_a_full_batch_per_replica_and_a_replica_takes_its_queue():
    fixed = deployment_options(RayOptions(replicas=2), threads=1, max_batch=16, max_queue=64, grace=5)
    assert fixed["num_replicas"] == 2 and fixed["ray_actor_options"] == {"num_cpus": 1}
    # requests wait in the replica (bodies still arriving hold no slot); the router holds more only
    # while every replica is full or starting
    assert fixed["max_ongoing_requests"] == 16 + 64 and fixed["max_queued_requests"] == 64
    # ... so the router must not fill the proxy's node's replica first
    assert fixed["request_router_config"] == {"request_router_class": ROUTER}
    assert fixed["backpressure_config"]["status_code"] == 429
    scaled = deployment_options(RayOptions(min_replicas=0, max_replicas=3), 2, 16, 64, 5)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "initial_replicas": 1,
                                            "target_ongoing_requests": 16}


def test_the_proxys_keep_alive_is_the_servers_in_whole_seconds():
    assert http_options("127.0.0.1", 8000, 5.0) == {"host": "127.0.0.1", "port": 8000, "keep_alive_timeout_s": 5}
    assert http_options("127.0.0.1", 8000, 2.5)["keep_alive_timeout_s"] == 3
    assert http_options("127.0.0.1", 8000, 0.2)["keep_alive_timeout_s"] == 1


@pytest.mark.parametrize("args, option", [(["--replicas", "2"], "--replicas"),
                                          (["--ray-address", "auto"], "--ray-address"),
                                          (["--ray", "--replicas", "2", "--min-replicas", "1",
                                            "--max-replicas", "2"], "--replicas")])
def test_ray_options_that_cannot_apply_are_refused_naming_them(args, option):
    r = subprocess.run([sys.executable, "-m", "specdecode", "serve", *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert option in r.stderr and "Traceback" not in r.stderr


# ---- what listens where -------------------------------------------------------------------
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def _listeners() -> set[tuple[str, str]]:
    """(address, program) of every listening TCP socket not on loopback."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and address.split(":")[0] not in LOOPBACK:
                    inodes[inode] = address
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        found.add((inodes[target[8:-1]], f.read().split(b"\0")[0].decode()))
        except OSError:
            continue
    return found


def _stalled_bodies_are_timed_out_without_holding_slots(base: str) -> None:
    """More stalled bodies than the replica's batch has slots: a whole request is answered while
    they stall, and each then gets 408 and its socket closed."""
    import select

    body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "max_tokens": 2,
                       "temperature": 0}).encode()
    stalled = [raw_request(base, json_post_head("/v1/completions", body) + body[:10]) for _ in range(24)]
    answer = httpx.post(base + "/v1/completions", content=body, headers={"content-type": "application/json"},
                        timeout=60)
    assert answer.status_code == 200
    answered_first, _, _ = select.select(stalled, [], [], 0)
    assert answered_first == [], "the whole request waited for the stalled bodies' 408"
    for sock in stalled:
        reply = read_until_closed(sock)  # the proxy forwards the replica's 408 and closes the socket
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]


def test_serve_with_ray_stays_on_loopback_times_out_slow_clients_and_stops_within_its_grace():
    before = _listeners()
    port = free_port()
    # 16 slots (the default batch); the body timeout is far above a 2-token request's time
    proc = subprocess.Popen([sys.executable, "-m", "specdecode", "serve", "--ray", "--replicas", "1",
                             "--threads", "1", "--port", str(port), "--draft", "ngram", "--backend", "llamacpp",
                             "--shutdown-grace", "2", "--body-timeout", "5", "--keep-alive-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-specdecode-replica"]
        assert _listeners() - before == set()
        _stalled_bodies_are_timed_out_without_holding_slots(base)
        # an idle kept-alive connection is closed by the proxy (Serve's own default: after 90 s)
        idle = raw_request(base, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=30)
        assert read_until_closed(idle).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()  # the bound only keeps a hung shutdown from hanging the suite
    finally:
        if proc.poll() is None:  # a failed check: stop Ray cleanly, so that it does not outlive the test
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---- a two-node cluster, a replica on each --------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    from ray import serve
    from ray.cluster_utils import Cluster

    from specdecode.config import DEFAULTS
    from specdecode.server.app import ModelSpec
    from specdecode.server.ray_serve import start

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, logging_level="warning", log_to_driver=False)
    port = free_port()
    options = RayOptions(replicas=2, address=nodes.address)
    server_options = dict(max_queue=8, max_batch=2, defaults=DEFAULTS, shutdown_grace=2.0)
    threads = start(ModelSpec(draft="ngram", backend="llamacpp"), MODEL, server_options, options, "127.0.0.1", port)
    assert threads == 1  # the smallest node's cores
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    nodes.shutdown()


def _complete(base: str, max_tokens: int = 16, prompt: str = PROMPT, timeout: float = 120) -> httpx.Response:
    return httpx.post(base + "/v1/completions", timeout=timeout,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def _answered(base: str, max_tokens: int):
    """``_complete``'s response, and when it came (to order it against other events)."""
    response = _complete(base, max_tokens)
    return response, time.perf_counter()


def _metrics(base: str, name: str) -> dict[str, float]:
    return _samples(httpx.get(base + "/metrics", timeout=30).text, name)


def _read_since(base: str, moment: float) -> bool:
    """Whether the board holds every replica's metrics as read after ``moment`` (Unix time)."""
    times = _metrics(base, SNAPSHOT_METRIC)
    return len(times) == 2 and min(times.values()) > moment


def _pushed_since(base: str, moment: float) -> None:
    until(lambda: _read_since(base, moment), "both replicas pushed their metrics")


def _replicas_answering(base: str) -> set[str]:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # together: the router spreads them
        return {r.headers["x-specdecode-replica"] for r in pool.map(lambda _: _complete(base, 4), range(4))}


def test_each_replica_answers_as_plain_decoding_does(cluster):
    cli = subprocess.run([sys.executable, "-m", "specdecode", "generate", PROMPT, "--no-chat", "--json",
                          "--max-new-tokens", "16", "--backend", "llamacpp"], capture_output=True, text=True,
                         check=True)
    expected = json.loads(cli.stdout)["text"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 2 replicas x 2 slots
        answers = list(pool.map(lambda _: _complete(cluster), range(4)))
    assert len({r.headers["x-specdecode-replica"] for r in answers}) == 2, "requests should reach both replicas"
    assert [r.json()["choices"][0]["text"] for r in answers] == [expected] * 4


def test_a_stream_through_ray_equals_the_whole_answer(cluster):
    import openai

    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name three primary colors."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True))
    assert streamed == full.choices[0].message.content


def test_both_nodes_hold_a_replica(cluster):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert ray.cluster_resources()["CPU"] == 2 and ray.available_resources().get("CPU", 0) == 0


def test_metrics_cover_every_replica_under_vllms_names(cluster):
    _pushed_since(cluster, time.time())  # what earlier tests generated is on the board
    before = _metrics(cluster, "vllm:generation_tokens_total")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _complete(cluster, max_tokens=12), range(4)))
    sent = sum(r.json()["usage"]["completion_tokens"] for r in answers)
    _pushed_since(cluster, time.time())
    after = _metrics(cluster, "vllm:generation_tokens_total")
    assert len(after) == 2
    assert sum(after.values()) - sum(before.values()) == sent


def test_past_every_replicas_slots_and_queue_clients_get_429_with_retry_after(cluster):
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        burst = [pool.submit(_answered, cluster, 96) for _ in range(48)]
        until(lambda: sum(_metrics(cluster, "vllm:num_requests_running").values()) == 4, "every slot is busy")
        health = httpx.get(cluster + "/health", timeout=10)  # every slot is busy: probes do not queue
        health_at = time.perf_counter()
        assert health.status_code == 200 and health.json() == {"status": "ok", "replicas": 2}
        answers, done_at = zip(*[f.result() for f in burst])
    # answered before any of the requests it would have queued behind had its 96 tokens
    assert health_at < min(at for r, at in zip(answers, done_at) if r.status_code == 200)
    codes = [r.status_code for r in answers]
    assert set(codes) == {200, 429}, codes
    # 48 against 2 replicas x (2 slots + 8 waiting) and 8 waiting in the router: the router counts
    # every request it has not yet placed among its 8, so under a burst it may refuse some before
    # every replica's queue is full (15 to 28 answered here), and requests answered while the burst
    # is still arriving free places for it (45 answered once, on a quiet machine): how many are
    # refused depends on timing, that the excess is refused with a Retry-After does not
    assert codes.count(200) >= 4 and codes.count(429) >= 1, [(r.status_code, r.text[:80]) for r in answers]
    assert all(int(r.headers["retry-after"]) >= 1 for r in answers if r.status_code == 429)


def test_a_client_that_disconnects_frees_its_slot_in_the_replica(cluster):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    _pushed_since(cluster, time.time())
    before = sum(_metrics(cluster, "vllm:generation_tokens_total").values())
    with httpx.stream("POST", cluster + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    left = time.time()
    until(lambda: _read_since(cluster, left) and sum(_metrics(cluster, "vllm:num_requests_running").values()) == 0,
           "the slot is freed")
    assert sum(_metrics(cluster, "vllm:generation_tokens_total").values()) - before < 2000  # cut, not run out


def test_a_killed_replica_fails_its_requests_at_once_and_is_replaced(cluster):
    from ray import serve

    names = _replicas_answering(cluster)
    victim = sorted(names)[0]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}

    def request(stream: bool):
        started = time.time()
        try:
            with httpx.stream("POST", cluster + "/v1/completions", json={**body, "stream": stream}, timeout=90) as r:
                r.read()
                return r.status_code, r.headers.get("x-specdecode-replica"), time.time() - started
        except httpx.HTTPError as exc:  # a stream cut when its replica died
            return type(exc).__name__, None, time.time() - started

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(request, i % 2 == 0) for i in range(4)]
        # all four inside the replicas (a replica queues what its two slots cannot take yet)
        until(lambda: sum(_metrics(cluster, "vllm:num_requests_running").values())
              + sum(_metrics(cluster, "vllm:num_requests_waiting").values()) == 4, "all four in the replicas")
        ray.kill(ray.get_actor(f"SERVE_REPLICA::specdecode#{DEPLOYMENT}#{victim}", namespace="serve"),
                 no_restart=True)
        outcomes = [f.result(timeout=120) for f in futures]  # none hangs
    for status, replica, seconds in outcomes:
        assert status == 200 or replica != victim
        assert status in (200, 500, "RemoteProtocolError", "ReadError"), outcomes
    until(lambda: serve.status().applications["specdecode"].deployments[DEPLOYMENT]
          .replica_states.get("RUNNING") == 2, "a second replica running again", polls=900)
    # A replica the controller calls RUNNING reaches the proxy's router a little later (a long
    # poll), so rounds of requests go on until both running replicas have answered.
    seen: set[str] = set()

    def both_answered() -> bool:
        seen.update(_replicas_answering(cluster))
        return len(seen - {victim}) == 2

    until(both_answered, "both running replicas answering", polls=300)
    assert victim not in seen, seen
