"""The OpenAI-compatible app (FastAPI): routes, responses, server-sent events.

The worker thread runs the engine off the event loop: up to ``max_batch`` requests in one pass
each step (``batching.BatchEngine``), or one at a time (the decoder's one-slot engine) where the
target cannot batch. Requests wait in a bounded queue; past it, or past the queue's wait limit, the server
answers 429 with ``Retry-After``. A client that disconnects, queued or running, frees its place at
once (its generation stops at the next step). Bodies are size-limited and parsed (tokenised) off
the event loop. Metrics follow vLLM's names so existing dashboards work.
"""

# no "from __future__ import annotations": FastAPI reads the routes' annotations (Request) at run time
import asyncio
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from ..batching import BatchEngine
from ..config import (
    DEFAULT_BACKEND,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_DEVICE,
    DEFAULT_DRAFT,
    DEFAULT_DTYPE,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_STEP_TOKENS,
    DEFAULT_QUEUE_TIMEOUT_S,
    DEFAULT_SHUTDOWN_GRACE_S,
    DEFAULTS,
    ConfigError,
    GenerationConfig,
    check_serving,
)
from ..engine import SpeculativeDecoder
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .requests import ParsedRequest, RequestError, max_token_chars, parse_int, parse_request
from .schema import chat_body, completion_body, openapi_body
from .worker import Job, Worker

SPEC_STATS_KEY = "speculative_decoding"  # extension field on responses
REPLICA_HEADER = "x-specdecode-replica"  # which Ray Serve replica answered
MAX_BODY_BYTES = 2 * 2**20  # 2 MiB: far more text than any context here holds (413 beyond it)
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ModelSpec:
    """What a server loads: ``api.load``'s arguments (picklable, so Ray replicas can load it too)."""

    target: str | None = None
    draft: str = DEFAULT_DRAFT
    dtype: str = DEFAULT_DTYPE
    device: str = DEFAULT_DEVICE
    backend: str = DEFAULT_BACKEND
    threads: int | None = None

    def load(self) -> SpeculativeDecoder:
        from ..api import load

        return load(self.target, self.draft, dtype=self.dtype, device=self.device, backend=self.backend,
                    threads=self.threads)


class Server:
    """The loaded decoder (loaded on a thread, so /health answers while it loads), its worker and
    metrics, and the defaults requests get. ``replica`` (under Ray Serve) names this copy in an
    ``x-specdecode-replica`` response header."""

    def __init__(self, loader, model_name: str, max_queue: int = DEFAULT_MAX_QUEUE,
                 defaults: GenerationConfig = DEFAULTS, max_batch: int | None = None, slot_context: int | None = None,
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S,
                 shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S, on_load_error=None, replica: str | None = None,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S):
        self.loader, self.model_name, self.max_queue, self.defaults = loader, model_name, max_queue, defaults
        self.max_batch, self.slot_context, self.max_step_tokens = max_batch, slot_context, max_step_tokens
        self.queue_timeout, self.shutdown_grace = queue_timeout, shutdown_grace
        check_serving(max_queue, max_batch, slot_context, queue_timeout=queue_timeout, shutdown_grace=shutdown_grace,
                      body_timeout=body_timeout)
        self.body_timeout = body_timeout
        self.on_load_error = on_load_error  # called with the exception (the CLI exits with its message)
        self.decoder: SpeculativeDecoder | None = None
        self.worker: Worker | None = None
        self.max_context = 0
        self.max_chars: int | None = None  # the longest prompt text that can fit, once loaded
        self.metrics = Metrics(model_name)
        self.load_error: str | None = None
        self.created = int(time.time())
        self.replica = replica

    def load(self) -> None:
        """Load the decoder and start the worker (raises what loading raised), on a thread of its own
        that has ended when this returns.

        Loading runs passes (llama.cpp's warm-up, the cost calibration), and OpenMP (libgomp, which
        llama.cpp and torch share) keeps a team of threads for every live thread that ran a
        parallel region. With more such threads than cores it stops spinning at barriers and puts
        threads to sleep, and llama.cpp meets a barrier at every node of its graph, so the worker's
        passes slow down for as long as a thread that loaded lives on (Ray Serve constructs a
        replica on a thread it keeps). The worker must be the only live thread that ran one."""
        failure: list[BaseException] = []

        def run():
            try:
                self._load()
            except BaseException as exc:  # re-raised on the caller's thread
                failure.append(exc)

        loader = threading.Thread(target=run, name="specdecode-loader", daemon=True)
        loader.start()
        loader.join()
        if failure:
            raise failure[0]

    def _load(self) -> None:
        self.decoder = self.loader()
        engine = make_engine(self.decoder, self.max_batch, self.slot_context, self.max_step_tokens)
        self.max_context = engine.max_context
        self.max_chars = engine.max_context * max_token_chars(self.decoder.tokenizer)
        self.worker = Worker(engine, self.metrics, self.max_queue, self.queue_timeout)

    def start_loading(self) -> None:
        def load():
            try:
                self._load()  # on this thread, which ends once loaded (see ``load``)
            except Exception as exc:
                self.load_error = str(exc)
                print(f"specdecode: could not start: {exc}", file=sys.stderr, flush=True)
                if self.on_load_error is not None:
                    self.on_load_error(exc)

        threading.Thread(target=load, name="specdecode-loader", daemon=True).start()

    @property
    def ready(self) -> bool:
        return self.worker is not None

    def parse(self, body, chat: bool) -> ParsedRequest:
        return parse_request(body, chat, self.decoder, self.model_name, self.defaults, self.max_context,
                             self.max_chars)


def make_engine(decoder: SpeculativeDecoder, max_batch: int | None, slot_context: int | None,
                max_step_tokens: int):
    """The engine over ``max_batch`` slots where the decoder can batch (None: ``DEFAULT_MAX_BATCH``
    there), else one request at a time; ``max_batch`` 1 is always one at a time: the decoder's
    one-slot engine, as ``generate`` runs it."""
    if max_batch is None:
        try:
            return BatchEngine.for_decoder(decoder, DEFAULT_MAX_BATCH, slot_context, max_step_tokens)
        except ConfigError:
            return decoder.engine()
    if max_batch == 1:
        return decoder.engine()
    return BatchEngine.for_decoder(decoder, max_batch, slot_context, max_step_tokens)


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


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _logprobs_json(tokenizer, logprobs, chat: bool, offset: int = 0):
    """OpenAI's logprobs object: chat's ``{"content": [...]}`` or completions' four lists."""
    if chat:
        def entry(token, logprob):
            text = _token_text(tokenizer, token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs]}
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        tokens.append(_token_text(tokenizer, lp.token))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{_token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


async def _read_body(request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {declared} bytes exceeds {MAX_BODY_BYTES}")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or told so by ``_with_body_timeout``: the answer goes nowhere
        raise RequestError(408, "the request body did not arrive") from None
    return b"".join(chunks)


def _request_error(item) -> RequestError:
    """What the worker reported as an error: a request error as it is, anything else a 500."""
    return item if isinstance(item, RequestError) else RequestError(500, f"generation failed: {item}",
                                                                      kind="server_error")


def _json(raw: bytes):
    try:
        return json.loads(raw, parse_int=parse_int)
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise RequestError(400, f"request body is not valid JSON: {reason}") from None


def _with_header(app, name: str, value: str):
    """The ASGI app with one header added to every response (streams included)."""
    header = (name.encode("latin-1"), value.encode("latin-1"))

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, send_with_header)

    return wrapped


def _with_body_timeout(app, seconds: float):
    """The ASGI app with a deadline on each request's body: one not complete ``seconds`` after
    the request arrived gets 408 with ``connection: close`` (the server then closes the socket),
    and the app is told the client left, so that nothing of it is held (``_read_body``)."""
    body = json.dumps(RequestError(408, f"request body not received within {seconds:g} s").body()).encode()
    start = {"type": "http.response.start", "status": 408,
             "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]}

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, state = loop.time() + seconds, {"body": False, "started": False, "timed_out": False}

        async def timed_receive():
            if state["timed_out"]:
                return {"type": "http.disconnect"}
            if state["body"]:  # after the body: waiting for a disconnect is the app's, unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                state["timed_out"] = True
                if not state["started"]:
                    state["started"] = True
                    await send(start)
                    await send({"type": "http.response.body", "body": body})
                return {"type": "http.disconnect"}
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["body"] = True
            return message

        async def guarded_send(message):
            if state["timed_out"]:
                return  # the 408 has been sent; what the app answers to a client that "left" goes nowhere
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await app(scope, timed_receive, guarded_send)

    return wrapped


def create_app(server: Server):
    """The FastAPI app serving ``server``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        if not server.ready:
            server.start_loading()
        yield
        if server.worker is not None:
            await asyncio.to_thread(server.worker.stop, server.shutdown_grace)

    app = FastAPI(title="specdecode", lifespan=lifespan)

    def error(exc: RequestError) -> JSONResponse:
        server.metrics.failed.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a JSON 500, never a plain-text page
        return error(RequestError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    @app.get("/health")
    async def health():
        if server.load_error:
            return JSONResponse({"status": "error", "detail": server.load_error}, status_code=503)
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "specdecode"}]}

    async def handle(request: Request, chat: bool):
        if not server.ready:
            return error(RequestError(503, "model is loading" if not server.load_error else server.load_error,
                                      kind="service_unavailable"))
        try:
            body = _json(await _read_body(request))
            parsed = await asyncio.to_thread(server.parse, body, chat)  # tokenising is not the event loop's
            job = Job(parsed.prompt_ids, parsed.config, asyncio.get_running_loop())
            server.worker.submit(job)
        except RequestError as exc:
            return error(exc)
        watch = asyncio.create_task(_watch(request, job))
        kind, item = await job.events.get()  # "started" once it has a slot, or "error" (429, 400, 503)
        if kind == "error":
            watch.cancel()
            return error(_request_error(item))
        server.metrics.prompt_tokens.inc(len(job.prompt_ids))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": server.model_name}
        started = job.enqueued
        if parsed.stream:
            watch.cancel()  # the streaming response notices a disconnect itself
            return StreamingResponse(_sse(job, meta, chat, parsed.include_usage, started),
                                     media_type="text/event-stream")
        try:
            return await _complete(job, meta, chat, started)
        finally:
            watch.cancel()

    async def _watch(request: Request, job: Job):
        """Until the answer is complete: a client that hangs up frees its queue place or slot now."""
        while not job.cancel.is_set():
            if await request.is_disconnected():
                server.worker.withdraw(job)
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    async def _complete(job: Job, meta: dict, chat: bool, started: float):
        pieces, tokens, last, first, logprobs = [], 0, None, None, []
        try:
            while True:
                kind, item = await job.events.get()
                if kind == "done":
                    break
                if kind == "error":
                    return error(_request_error(item))
                first = first or time.perf_counter()
                pieces.append(item.text)
                tokens += len(item.token_ids)
                logprobs += item.logprobs
                last = item
        finally:
            job.cancel.set()
        if last is None or last.finish_reason is None:  # the client left, or the server is stopping
            return error(RequestError(503, "generation cancelled", kind="service_unavailable"))
        _observe_finish(last, started, first)
        text = "".join(pieces)
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": tokens,
                 "total_tokens": len(job.prompt_ids) + tokens}
        lp = None if job.config.logprobs is None else _logprobs_json(server.decoder.tokenizer, logprobs, chat)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": last.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": last.finish_reason}
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

        def chunk(text: str | None, finish: str | None, role: bool = False, logprobs=None) -> str:
            lp = None if job.config.logprobs is None or logprobs is None else \
                _logprobs_json(server.decoder.tokenizer, logprobs, chat, sent)
            if chat:
                delta = (
                    {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                )
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return "data: " + json.dumps({**meta, "object": obj, "choices": [choice]}) + "\n\n"

        tokens, last, first, sent, held = 0, None, None, 0, []
        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                kind, item = await job.events.get()
                if kind == "done":
                    break
                if kind == "error":
                    body = _request_error(item).body()
                    yield "data: " + json.dumps(body) + "\n\n"
                    break
                first = first or time.perf_counter()
                tokens += len(item.token_ids)
                last = item
                held += item.logprobs  # sent with the next chunk that carries text
                if item.text or item.finish_reason:
                    yield chunk(item.text if item.text else ("" if not chat else None), item.finish_reason,
                                logprobs=held)
                    sent += len(item.text)
                    held = []
            _observe_finish(last, started, first)
            if include_usage and last is not None:
                usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": tokens,
                         "total_tokens": len(job.prompt_ids) + tokens}
                yield "data: " + json.dumps({**meta, "object": obj, "choices": [], "usage": usage,
                                             SPEC_STATS_KEY: _spec_stats(last.stats)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # normal end, or the client disconnected and this generator was closed

    @app.post("/v1/completions", openapi_extra=openapi_body(completion_body()))
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(chat_body()))
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    timed = _with_body_timeout(app, server.body_timeout)
    return timed if server.replica is None else _with_header(timed, REPLICA_HEADER, server.replica)
