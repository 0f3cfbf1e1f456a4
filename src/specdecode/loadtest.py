"""``specdecode loadtest``: a bounded load on OpenAI-compatible servers on loopback, as clients send it.

For each concurrency (closed loop: that many clients, each sending its next request when the last
one finished) or request rate (open loop: Poisson arrivals), a fixed number of streamed chat
requests with prompts from a Spec-Bench-format file; per server and load: total output tokens per
second, time to first token (TTFT) and time per output token after the first (TPOT), p50 and p95,
and end-to-end latency. Servers are measured one after another at each load, on the same prompts.

A shared machine is noisy (the same work has been seen to take 1.4x as long from one minute to the
next), so one run per server compares the minutes as much as the servers. With ``rounds`` > 1 every
load is measured that many times, each round visiting every server in turn (the order rotated so
no server always goes first) on prompts of its own, and a row reports the median over rounds.
Prompts are not reused within a run while the file has enough of them, so no server is helped by a
prompt cache warmed in an earlier round or load.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

from .bench import load_questions
from .config import ConfigError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class LoadSettings:
    servers: dict[str, str]  # name -> base URL (http://127.0.0.1:PORT)
    dataset: str
    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    rate: float | None = None  # requests per second (open loop) instead of concurrency
    requests: int | None = None  # per load; default: twice the concurrency, at least 8
    max_tokens: int = 128
    ignore_eos: bool = True  # every request generates max_tokens, so loads compare like for like
    model: str | None = None  # the "model" field; None: each server's first listed model
    timeout: float = 600.0
    seed: int = 0  # which prompts, in which order
    rounds: int = 1  # times each load is measured on each server, the servers interleaved

    def validate(self) -> "LoadSettings":
        if not self.servers:
            raise ConfigError("url", "give at least one server")
        for name, url in self.servers.items():
            parsed = urlparse(url)
            if parsed.scheme != "http" or parsed.hostname not in LOOPBACK:
                raise ConfigError("url", f"load tests send to loopback only: http://127.0.0.1:PORT (got {url!r})")
        if not self.concurrencies or any(not isinstance(c, int) or c < 1 for c in self.concurrencies):
            raise ConfigError("concurrency", f"must be integers >= 1 (got {self.concurrencies!r})")
        if self.rate is not None and not self.rate > 0:
            raise ConfigError("rate", f"must be > 0 requests per second (got {self.rate!r})")
        if self.requests is not None and self.requests < 1:
            raise ConfigError("requests", f"must be >= 1 (got {self.requests!r})")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError("rounds", f"must be an integer >= 1 (got {self.rounds!r})")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be >= 1 (got {self.max_tokens!r})")
        return self


@dataclass
class RequestResult:
    ok: bool
    tokens: int
    ttft_s: float | None
    e2e_s: float
    error: str | None = None
    retries: int = 0  # times it was sent again after its connection closed unanswered

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


RETRIES = 2  # as the openai client does: a request whose connection closed before any answer is sent again


async def _one(client, url: str, model: str, prompt: str, settings: LoadSettings) -> RequestResult:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": settings.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    for attempt in range(RETRIES + 1):
        try:
            result = await _attempt(client, url, body, start)
            result.retries = attempt
            return result
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:  # no response: a kept-alive
            error = f"{type(exc).__name__}: {exc}"                      # connection the server had closed
        except Exception as exc:  # a failed request is counted, not fatal
            return RequestResult(False, 0, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}", attempt)
    return RequestResult(False, 0, None, time.perf_counter() - start, error, RETRIES)


async def _attempt(client, url: str, body: dict, start: float) -> RequestResult:
    """One try; what fails before the response starts is raised (``_one`` may retry it), what
    fails after it is a failed result."""
    first, tokens, chunks, done = None, None, 0, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        try:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return RequestResult(False, 0, None, time.perf_counter() - start, f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                done |= line == "data: [DONE]"
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        chunks += 1
        except Exception as exc:
            return RequestResult(False, 0, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not done:  # a stream cut short (its server went away) is a failure, not a short answer
        return RequestResult(False, 0, None, end - start, "the stream ended before [DONE]")
    return RequestResult(True, tokens if tokens is not None else chunks, None if first is None else first - start,
                         end - start)


async def _load(url: str, model: str, prompts: list[str], settings: LoadSettings, concurrency: int | None,
                progress) -> tuple[list[RequestResult], float]:
    import httpx

    limits = httpx.Limits(max_connections=max(concurrency or 64, 1) + 4)
    async with httpx.AsyncClient(timeout=settings.timeout, limits=limits) as client:
        results: list[RequestResult] = []
        start = time.perf_counter()
        if concurrency is not None:  # closed loop
            queue = list(prompts)

            async def user():
                while queue:
                    results.append(await _one(client, url, model, queue.pop(0), settings))
                    progress.update(1)

            await asyncio.gather(*(user() for _ in range(concurrency)))
        else:  # open loop, Poisson arrivals
            rng = random.Random(settings.seed)
            tasks = []
            for p in prompts:
                tasks.append(asyncio.create_task(_one(client, url, model, p, settings)))
                await asyncio.sleep(rng.expovariate(settings.rate))
            for t in asyncio.as_completed(tasks):
                results.append(await t)
                progress.update(1)
        return results, time.perf_counter() - start


def _first_model(url: str) -> str:
    import httpx

    try:
        return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    except Exception as exc:
        raise ConfigError("url", f"no model listed at {url}/v1/models ({exc})") from None


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok), "retried": sum(r.retries for r in results),
        "output_tokens": tokens, "wall_s": wall_s,
        "throughput_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "tpot_p50_s": percentile(tpot, 0.5), "tpot_p95_s": percentile(tpot, 0.95),
        "e2e_p50_s": percentile(e2e, 0.5), "e2e_p95_s": percentile(e2e, 0.95),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "error_counts": dict(collections.Counter(r.error for r in results if r.error)),
        "failed_within_s": max((r.e2e_s for r in results if not r.ok), default=None),  # the slowest failure
    }


MEDIAN_KEYS = ("throughput_tok_s", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s", "tpot_p95_s", "e2e_p50_s", "e2e_p95_s")


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from a server's rounds at one load: counts summed, each rate and percentile the
    median over rounds (each round is one sample of the machine), the throughput's range and the
    rounds themselves kept."""
    if len(rounds) == 1:
        return rounds[0]
    row = {k: sum(r[k] for r in rounds) for k in ("requests", "failed", "retried", "output_tokens", "wall_s")}
    for k in MEDIAN_KEYS:
        values = [r[k] for r in rounds if r[k] is not None]
        row[k] = statistics.median(values) if values else None
    counts = sum((collections.Counter(r["error_counts"]) for r in rounds), collections.Counter())
    row.update(errors=sorted(counts)[:5], error_counts=dict(counts),
               failed_within_s=max((r["failed_within_s"] for r in rounds if r["failed_within_s"] is not None),
                                   default=None),
               throughput_range=[min(r["throughput_tok_s"] for r in rounds),
                                 max(r["throughput_tok_s"] for r in rounds)],
               rounds=rounds)
    return row


def run_loadtest(settings: LoadSettings, progress: bool = True) -> dict:
    from tqdm import tqdm

    settings = settings.validate()
    questions = load_questions(settings.dataset, None, None)
    if not questions:
        raise ConfigError("dataset", f"no questions in {settings.dataset}")
    rng = random.Random(settings.seed)
    order = [q["turns"][0] for q in questions]
    rng.shuffle(order)
    loads = [None] if settings.rate is not None else list(settings.concurrencies)
    models = {name: settings.model or _first_model(url) for name, url in settings.servers.items()}
    names = list(settings.servers)
    warmup = replace(settings, max_tokens=min(8, settings.max_tokens))
    for name in names:  # one unmeasured request each: a server just started has paid no first-request costs
        asyncio.run(_load(settings.servers[name], models[name], order[-1:], warmup, 1, tqdm(disable=True)))
    rows, used = [], 0
    for load in loads:
        n = settings.requests or max(8, 2 * (load or 4))
        label = f"rate {settings.rate:g}/s" if load is None else f"{load} concurrent"
        measured: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(settings.rounds):
            prompts = [order[(used + i) % len(order)] for i in range(n)]
            used += n
            for name in names[r % len(names):] + names[:r % len(names)]:
                desc = f"{name} {label}" + (f" round {r + 1}/{settings.rounds}" if settings.rounds > 1 else "")
                with tqdm(total=n, desc=desc, unit="req", disable=not progress) as bar:
                    results, wall = asyncio.run(_load(settings.servers[name], models[name], prompts, settings,
                                                      load, bar))
                measured[name].append(summarize(results, wall))
        rows += [{"server": name, "concurrency": load, "rate": settings.rate, **merge_rounds(measured[name])}
                 for name in names]
    return {"settings": {**asdict(settings), "servers": dict(settings.servers)}, "rows": rows}


def format_table(result: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f}"

    rounds = result["settings"].get("rounds", 1)
    tps = "tok/s total" if rounds == 1 else f"tok/s total, median (range) of {rounds} rounds"
    lines = [f"| server | load | requests | failed | {tps} | TTFT p50 / p95 ms | TPOT p50 / p95 ms | "
             "e2e p50 / p95 s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        load = f"{r['concurrency']} conc." if r["concurrency"] is not None else f"{r['rate']:g} req/s"
        e2e = "-" if r["e2e_p50_s"] is None else f"{r['e2e_p50_s']:.1f} / {r['e2e_p95_s']:.1f}"
        tps = f"{r['throughput_tok_s']:.1f}"
        if "throughput_range" in r:
            tps += " ({:.0f}-{:.0f})".format(*r["throughput_range"])
        failed = f"{r['failed']}" + (f" ({r['retried']} resent)" if r.get("retried") else "")
        lines.append(f"| {r['server']} | {load} | {r['requests']} | {failed} | {tps} | "
                     f"{ms(r['ttft_p50_s'])} / {ms(r['ttft_p95_s'])} | {ms(r['tpot_p50_s'])} / {ms(r['tpot_p95_s'])} | "
                     f"{e2e} |")
    return "\n".join(lines)


def write_results(result: dict, out: str) -> list[Path]:
    """results.json, table.md and loadtest.png (throughput and p95 TTFT by load, per server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "table.md", out_dir / "loadtest.png"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(format_table(result) + "\n")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["server"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["server"] == name and r["concurrency"] is not None]
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        a.plot(xs, [r["throughput_tok_s"] for r in rows], marker="o", label=name)
        b.plot(xs, [(r["ttft_p95_s"] or 0) for r in rows], marker="o", label=name)
    for ax, title in ((a, "output tokens/s, all requests"), (b, "time to first token, p95 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
