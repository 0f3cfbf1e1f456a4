"""The llama-server peer of `bench --compare llamacpp --llama-server PATH`: the processes it starts
(on loopback, with the spec types asked for), the request it sends, the tokens it reads back, and
that it stops them. A stand-in server checks the protocol on every machine; the real binary runs
where SPECDECODE_LLAMA_SERVER names one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from specdecode import GenerationConfig
from specdecode.config import ConfigError, SpecDecodeError
from specdecode.peers import LlamaServerPeer, make_peers

# A stand-in for llama-server: takes its flags, answers /health, and /completion with tokens that
# say which --spec-type it was started with (none: 1s, ngram-simple: 2s), n_predict of them, only
# for the request the peer must send (token ids, greedy, no prompt cache, tokens returned).
STAND_IN = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
flag = lambda name: args[args.index(name) + 1]
assert flag("--host") == "127.0.0.1" and flag("-np") == "1" and flag("-fa") == "on"
fill = {"none": 1, "ngram-simple": 2}[flag("--spec-type")]
class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        self._send(200, {"status": "ok"})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = (self.path == "/completion" and all(isinstance(t, int) for t in body["prompt"])
              and body["temperature"] == 0 and body["top_k"] == 1 and body["cache_prompt"] is False
              and body["return_tokens"] is True and body["stream"] is False)
        self._send(200, {"tokens": [fill] * body["n_predict"]} if ok else {"error": body})
HTTPServer(("127.0.0.1", int(flag("--port"))), Handler).serve_forever()
'''


@pytest.fixture
def stand_in(tmp_path) -> str:
    script = tmp_path / "llama-server"
    script.write_text(f"#!{sys.executable}\n{STAND_IN}")
    script.chmod(0o755)
    return str(script)


def test_the_peer_runs_plain_and_ngram_servers_and_stops_them(stand_in, tmp_path):
    peer = LlamaServerPeer(stand_in, tmp_path / "model.gguf", threads=2, context=512)
    try:
        out = peer.run([5, 6, 7], GenerationConfig(max_new_tokens=4, ignore_eos=True))
        assert {name: tokens for name, (tokens, _) in out.items()} == {
            "llama_server": [1, 1, 1, 1], "llama_server_ngram": [2, 2, 2, 2]}
        assert all(seconds > 0 for _, seconds in out.values())
        with pytest.raises(ConfigError) as err:
            peer.run([5], GenerationConfig(temperature=0.8))
        assert err.value.param == "compare"
        procs = list(peer.procs)
    finally:
        peer.close()
    assert all(proc.poll() is not None for proc in procs)


def test_a_server_that_will_not_start_is_a_clear_error(tmp_path):
    broken = tmp_path / "llama-server"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(SpecDecodeError) as err:
        LlamaServerPeer(str(broken), tmp_path / "model.gguf", threads=2, context=512)
    assert err.value.param == "llama_server" and "exited with code 3" in str(err.value)


def test_llama_server_option_needs_compare_llamacpp_and_a_binary(tmp_path):
    with pytest.raises(ConfigError) as err:
        make_peers(None, None, None, None, llama_server=str(tmp_path / "llama-server"))
    assert err.value.param == "llama_server"


@pytest.mark.skipif(not os.environ.get("SPECDECODE_LLAMA_SERVER"), reason="SPECDECODE_LLAMA_SERVER not set")
def test_bench_runs_the_real_llama_server(tmp_path, capsys):
    from specdecode.cli import main

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["Repeat: one two three one two three"]}))
    argv = ["bench", "--dataset", str(data), "--compare", "llamacpp", "--llama-server",
            os.environ["SPECDECODE_LLAMA_SERVER"], "--max-new-tokens", "16", "--quiet", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    overall = json.loads(Path(tmp_path / "b" / "results.json").read_text())["overall"]
    assert overall["ratio_vs_llama_server"] > 0 and overall["ratio_vs_llama_server_ngram"] > 0
