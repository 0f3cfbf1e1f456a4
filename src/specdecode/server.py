"""``specdecode serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn).

One decoder serves one generation at a time (its KV caches are shared state), on a worker thread
off the event loop. Requests wait in a bounded queue; when it is full the server answers 429 at
once rather than letting clients hang. A client that disconnects cancels its generation at the next
step. Metrics follow vLLM's names so existing dashboards work.
"""


import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from .config import GenerationConfig, SpecDecodeError
from .engine import SpeculativeDecoder

SPEC_STATS_KEY = "speculative_decoding"  # extension field on responses


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- metrics ------------------------------------------------------------------------------------
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("vllm:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.failed = Counter("specdecode:request_failed", "Requests that ended in an error", ["status"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests generating now", registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued", registry=r)
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", buckets=buckets, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time spent queued", buckets=buckets, registry=r)
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Steps that drafted at least one token", registry=r)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens", registry=r)
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Accepted drafted tokens", registry=r)
        self.accepted_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted drafted tokens by position",
                                    ["position"], registry=r)

    def observe_step(self, rec) -> None:
        if rec.drafted:
            self.drafts.inc()
            self.draft_tokens.inc(rec.drafted)
            self.accepted.inc(rec.accepted)
            for i in range(rec.accepted):
                self.accepted_pos.labels(position=str(i)).inc()
        self.generation_tokens.inc(rec.emitted)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the worker -----------------------------------------------------------------------------------
@dataclass
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """Runs jobs one after another on a thread; the queue is bounded."""

    def __init__(self, decoder: SpeculativeDecoder, metrics: Metrics, max_queue: int):
        self.decoder, self.metrics = decoder, metrics
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="specdecode-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(429, f"server busy: {self.jobs.maxsize} requests already queued; retry later",
                               code="rate_limit_exceeded", kind="rate_limit_error") from None
        self.metrics.waiting.set(self.jobs.qsize())

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            self.metrics.waiting.set(self.jobs.qsize())
            if job is None:
                return
            if job.cancel.is_set():
                job.put(("done", None))
                continue
            self.metrics.queue_time.observe(time.perf_counter() - job.enqueued)
            self.metrics.running.set(1)
            try:
                for event in self.decoder.stream(job.prompt_ids, job.config):
                    self.metrics.observe_step(event.step)
                    job.put(("event", event))
                    if job.cancel.is_set():  # client went away: stop at this step
                        break
            except Exception as exc:  # reported to the client as a 500; the worker keeps serving
                job.put(("error", exc))
            finally:
                self.metrics.running.set(0)
                job.put(("done", None))


# ---- request parsing ------------------------------------------------------------------------------
def _number(body: dict, name: str, default, low=None, high=None, low_open=False, integer=False):
    value = body.get(name, default)
    if value is None:
        value = default
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


class Server:
    def __init__(self, loader, model_name: str, max_queue: int = 64):
        self.loader, self.model_name, self.max_queue = loader, model_name, max_queue
        self.decoder: SpeculativeDecoder | None = None
        self.worker: Worker | None = None
        self.metrics = Metrics()
        self.load_error: str | None = None
        self.created = int(time.time())

    def start_loading(self) -> None:
        def load():
            try:
                self.decoder = self.loader()
                self.worker = Worker(self.decoder, self.metrics, self.max_queue)
            except Exception as exc:
                self.load_error = str(exc)

        threading.Thread(target=load, name="specdecode-loader", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self.worker is not None

    def parse(self, body, chat: bool) -> tuple[list[int], GenerationConfig, bool, bool]:
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        model = body.get("model")
        if model not in (None, self.model_name):
            raise RequestError(400, f"model '{model}' does not exist; this server serves '{self.model_name}'",
                               "model", "model_not_found")
        if _number(body, "n", 1, integer=True) != 1:
            raise RequestError(400, "'n' must be 1: one choice per request", "n")
        dec = self.decoder
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
                for m in messages:
                    if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m["content"].strip() \
                            or m.get("role") not in ("system", "user", "assistant"):
                        raise RequestError(400, "each message needs a role (system, user, assistant) and non-empty "
                                           "string content", "messages")
                prompt_ids = dec.encode([{"role": m["role"], "content": m["content"]} for m in messages], chat=True)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                    if any(t < 0 or t >= dec.vocab_size for t in prompt):
                        raise RequestError(400, f"'prompt' token ids must be in [0, {dec.vocab_size})", "prompt")
                    prompt_ids = list(prompt)
                elif isinstance(prompt, str) and prompt.strip():
                    prompt_ids = dec.encode(prompt, chat=False)
                else:
                    raise RequestError(400, "'prompt' must be a non-empty string (or one string, or token ids)", "prompt")
        except SpecDecodeError as exc:
            raise RequestError(400, exc.message, exc.param) from None

        default_max = 16 if not chat else max(1, min(512, dec.max_context - len(prompt_ids)))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
        name = "max_tokens" if not chat or "max_completion_tokens" not in body else "max_completion_tokens"
        max_tokens = _number({name: max_tokens}, name, default_max, low=1, integer=True)
        temperature = _number(body, "temperature", 1.0, low=0, high=2)
        top_p = _number(body, "top_p", 1.0, low=0, high=1, low_open=True)
        top_k = _number(body, "top_k", 0, low=-1, integer=True)
        seed = body.get("seed")
        if seed is not None:
            seed = _number(body, "seed", None, low=0, integer=True)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        if dec.max_context and len(prompt_ids) + max_tokens > dec.max_context:
            raise RequestError(400, f"prompt ({len(prompt_ids)} tokens) plus {name} ({max_tokens}) exceeds the "
                               f"model's context of {dec.max_context} tokens", name, "context_length_exceeded")
        spec = body.get("speculative", {}) if isinstance(body.get("speculative"), dict) else {}
        try:
            config = GenerationConfig(
                max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                top_k=max(0, top_k), seed=seed, stop=tuple(stop),
                draft_len=spec.get("draft_len", self.default_draft_len),
                policy=spec.get("policy", self.default_policy), tree=spec.get("tree", "auto"),
            ).validate()
        except SpecDecodeError as exc:
            raise RequestError(400, exc.message, exc.param) from None
        return prompt_ids, config, stream, include_usage

    default_draft_len = 8
    default_policy = "cost"


def _spec_stats(stats) -> dict:
    return {
        "drafter": stats.drafter,
        "policy": stats.policy,
        "target_passes": stats.steps,
        "drafted_tokens": stats.drafted,
        "accepted_tokens": stats.accepted,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
        "accepted_per_position": stats.accepted_at,
        "drafted_per_position": stats.drafted_at,
        "reached_per_position": stats.reached_at,  # drafted, and every earlier position accepted
        "tokens_per_second": stats.tokens_per_second,
    }


def create_app(server: Server):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        server.start_loading()
        yield
        if server.worker is not None:
            server.worker.stop()

    app = FastAPI(title="specdecode", lifespan=lifespan)

    def error(exc: RequestError) -> JSONResponse:
        server.metrics.failed.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health():
        if server.load_error:
            return JSONResponse({"status": "error", "detail": server.load_error}, status_code=503)
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "specdecode"}]}

    async def handle(request: Request, chat: bool):
        if not server.ready:
            return error(RequestError(503, "model is loading" if not server.load_error else server.load_error,
                                      kind="service_unavailable"))
        try:
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(400, f"request body is not valid JSON: {exc}") from None
            prompt_ids, config, stream, include_usage = server.parse(body, chat)
            job = Job(prompt_ids, config, asyncio.get_running_loop())
            server.worker.submit(job)
        except RequestError as exc:
            return error(exc)
        server.metrics.prompt_tokens.inc(len(prompt_ids))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": server.model_name}
        started = time.perf_counter()
        if stream:
            return StreamingResponse(_sse(job, meta, chat, include_usage, started), media_type="text/event-stream")
        return await _complete(request, job, meta, chat, started)

    async def _complete(request, job: Job, meta: dict, chat: bool, started: float):
        pieces, tokens, last, first = [], 0, None, None
        try:
            while True:
                try:
                    kind, item = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel.set()
                        return Response(status_code=499)
                    continue
                if kind == "done":
                    break
                if kind == "error":
                    return error(RequestError(500, f"generation failed: {item}", kind="server_error"))
                first = first or time.perf_counter()
                pieces.append(item.text)
                tokens += len(item.token_ids)
                last = item
        finally:
            job.cancel.set()
        _observe_finish(last, started, first)
        text = "".join(pieces)
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": tokens,
                 "total_tokens": len(job.prompt_ids) + tokens}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
            obj = "text_completion"
        return {**meta, "object": obj, "choices": [choice], "usage": usage, SPEC_STATS_KEY: _spec_stats(last.stats)}

    def _observe_finish(last, started, first):
        now = time.perf_counter()
        server.metrics.e2e.observe(now - started)
        if first is not None:
            server.metrics.ttft.observe(first - started)
        if last is not None and last.finish_reason:
            server.metrics.requests.labels(finished_reason=last.finish_reason).inc()

    async def _sse(job: Job, meta: dict, chat: bool, include_usage: bool, started: float):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({**meta, "object": obj, "choices": [choice]}) + "\n\n"

        tokens, last, first = 0, None, None
        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                kind, item = await job.events.get()
                if kind == "done":
                    break
                if kind == "error":
                    body = RequestError(500, f"generation failed: {item}", kind="server_error").body()
                    yield "data: " + json.dumps(body) + "\n\n"
                    break
                first = first or time.perf_counter()
                tokens += len(item.token_ids)
                last = item
                if item.text or item.finish_reason:
                    yield chunk(item.text if item.text else ("" if not chat else None), item.finish_reason)
            _observe_finish(last, started, first)
            if include_usage and last is not None:
                usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": tokens,
                         "total_tokens": len(job.prompt_ids) + tokens}
                yield "data: " + json.dumps({**meta, "object": obj, "choices": [], "usage": usage,
                                             SPEC_STATS_KEY: _spec_stats(last.stats)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # normal end, or the client disconnected and this generator was closed

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


# ---- CLI ------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    import uvicorn

    from .api import load

    if not 1 <= args.max_queue <= 10000:
        raise SpecDecodeError("max_queue", f"must be in [1, 10000] (got {args.max_queue})")
    name = args.model_name or (args.target or "SmolLM2-135M-Instruct")
    server = Server(lambda: load(args.target, args.draft, dtype=args.dtype, device=args.device), name, args.max_queue)
    server.default_draft_len = args.draft_len
    server.default_policy = args.policy
    print(f"specdecode: serving {name} (draft: {args.draft}) on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(sub) -> None:
    from .cli import add_model_args
    from .config import POLICIES

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the id clients pass as 'model' (default: the target)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; past it: 429")
    p.add_argument("--draft-len", type=int, default=8)
    p.add_argument("--policy", default="cost", choices=POLICIES)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_serve)
