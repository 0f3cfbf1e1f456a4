"""The OpenAI-compatible app (FastAPI): routes, responses, server-sent events.

One decoder serves one generation at a time (its KV caches are shared state), on a worker thread
off the event loop. Requests wait in a bounded queue; when it is full the server answers 429 at
once rather than letting clients hang. A client that disconnects cancels its generation at the next
step. Metrics follow vLLM's names so existing dashboards work.
"""

# no "from __future__ import annotations": FastAPI reads the routes' annotations (Request) at run time
import asyncio
import json
import threading
import time
import uuid

from ..config import DEFAULTS, GenerationConfig
from ..engine import SpeculativeDecoder
from .metrics import Metrics
from .requests import ParsedRequest, RequestError, parse_request
from .worker import Job, Worker

SPEC_STATS_KEY = "speculative_decoding"  # extension field on responses
DEFAULT_MAX_QUEUE = 64  # requests that may wait for the worker; past it: 429


class Server:
    """The loaded decoder (loaded on a thread, so /health answers while it loads), its worker and
    metrics, and the defaults requests get."""

    def __init__(self, loader, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE,
                 defaults: GenerationConfig = DEFAULTS):
        self.loader, self.model_name, self.max_queue, self.defaults = loader, model_name, max_queue, defaults
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

    def parse(self, body, chat: bool) -> ParsedRequest:
        return parse_request(body, chat, self.decoder, self.model_name, self.defaults)


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
            parsed = server.parse(body, chat)
            prompt_ids, stream, include_usage = parsed.prompt_ids, parsed.stream, parsed.include_usage
            job = Job(prompt_ids, parsed.config, asyncio.get_running_loop())
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
                delta = (
                    {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                )
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
