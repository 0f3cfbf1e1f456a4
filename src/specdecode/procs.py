"""Servers this package starts as child processes, on loopback only: `loadtest` starting
`specdecode serve`, `bench --llama-server` starting llama.cpp's server."""

from __future__ import annotations

import socket
import subprocess
import time

from .config import SpecDecodeError


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], base: str, param: str, timeout_s: float = 300.0,
                 quiet: bool = False, name: str | None = None) -> subprocess.Popen:
    """Run ``command`` (a server told to listen at ``base``, on 127.0.0.1; its output dropped, its
    errors shown unless ``quiet``) and wait until its /health answers 200; a server that exits or
    stays unhealthy is a SpecDecodeError naming ``param``, the option that asked for it."""
    import httpx

    name = name or command[0]
    try:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet else None)
    except OSError as exc:
        raise SpecDecodeError(param, f"could not start {name}: {exc}") from None
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SpecDecodeError(param, f"{name} exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SpecDecodeError(param, f"{name} did not become healthy within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
