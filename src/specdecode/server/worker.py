"""The worker: one thread that runs the engine's steps and moves requests from a bounded queue
into free slots between steps.

The engine (``add``, ``cancel``, ``step``, ``free_slots``) is ``batching.BatchEngine``: many
requests in one pass, or the decoder's one-slot engine (``SpeculativeDecoder.engine``: draft
models, targets off the lean runner, ``--max-batch 1``).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..config import DEFAULT_QUEUE_TIMEOUT_S, DEFAULT_SHUTDOWN_GRACE_S, GenerationConfig, SpecDecodeError
from .metrics import Metrics
from .requests import RequestError

# what a running request gets when the shutdown grace period ends before it does
CUT = RequestError(503, "the server is shutting down; the generation was cut short", kind="service_unavailable")


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("started"|"event"|"error"|"done", item)
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when it got a slot

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class ServingEngine(Protocol):
    """What the worker drives: requests added into free slots, stepped together, cancelled."""

    max_context: int  # tokens (prompt + output) one request may hold
    running: dict  # slot -> the running request's handle

    @property
    def free_slots(self) -> int: ...

    def add(self, prompt_ids: list[int], config: GenerationConfig):
        """Start a request in a free slot; its handle (ConfigError when it cannot run here)."""
        ...

    def cancel(self, handle) -> None: ...

    def step(self) -> list[tuple[object, object]]:
        """Advance every running request; (handle, ``engine.StreamEvent``) for each that moved."""
        ...


class Worker:
    """Runs the engine on a thread; admits queued jobs into free slots between steps."""

    def __init__(self, engine: ServingEngine, metrics: Metrics, max_queue: int,
                 queue_timeout: float = DEFAULT_QUEUE_TIMEOUT_S):
        self.engine, self.metrics = engine, metrics
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.queue: deque[Job] = deque()
        self.active: dict[object, Job] = {}  # engine handle -> job
        self.lock = threading.Condition()
        self.stopping = False
        self.request_s = 5.0  # moving average of a request's time in a slot, for Retry-After
        self.thread = threading.Thread(target=self._run, name="specdecode-worker", daemon=True)
        self.thread.start()

    def retry_after(self) -> int:
        """Seconds after which a rejected client may find room: the queue ahead of it, drained at the
        measured rate."""
        slots = max(1, len(self.active) + self.engine.free_slots)
        return max(1, math.ceil(self.request_s * (1 + len(self.queue) / slots)))

    def _busy(self, message: str) -> RequestError:
        return RequestError(429, message, code="rate_limit_exceeded", kind="rate_limit_error",
                            headers={"Retry-After": str(self.retry_after())})

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.stopping:
                raise RequestError(503, "server is shutting down", kind="service_unavailable")
            if len(self.queue) >= self.max_queue:
                raise self._busy(f"server busy: {self.max_queue} requests already queued; retry later")
            self.queue.append(job)
            self.metrics.waiting.set(len(self.queue))
            self.lock.notify()

    def withdraw(self, job: Job) -> None:
        """A client left: drop its job from the queue at once (a running one stops at the next step)."""
        job.cancel.set()
        with self.lock:
            if job in self.queue:
                self.queue.remove(job)
                self.metrics.waiting.set(len(self.queue))
            self.lock.notify()

    def stop(self, grace: float = DEFAULT_SHUTDOWN_GRACE_S) -> None:
        """Refuse queued requests (503), let running ones finish within ``grace``, then cut them."""
        with self.lock:
            self.stopping = True
            while self.queue:
                self.queue.popleft().put(("error", RequestError(503, "server is shutting down",
                                                                kind="service_unavailable")))
            self.metrics.waiting.set(0)
            self.lock.notify()
        self.thread.join(grace)
        for job in list(self.active.values()):
            job.cancel.set()
        self.thread.join(grace)

    # ---- the thread ------------------------------------------------------------------------
    def _admit(self) -> None:
        now = time.perf_counter()
        for job in [j for j in self.queue if now - j.enqueued > self.queue_timeout]:
            self.queue.remove(job)
            job.put(("error", self._busy(f"not started within {self.queue_timeout:g} s; retry later")))
        while self.queue and self.engine.free_slots:
            job = self.queue.popleft()
            if job.cancel.is_set():
                continue
            try:
                handle = self.engine.add(job.prompt_ids, job.config)
            except SpecDecodeError as exc:
                job.put(("error", RequestError(400, exc.message, exc.param)))
                continue
            self.metrics.queue_time.observe(time.perf_counter() - job.enqueued)
            job.started = time.perf_counter()
            self.active[handle] = job
            job.put(("started", None))
        self.metrics.waiting.set(len(self.queue))
        self.metrics.running.set(len(self.active))

    def _finish(self, handle, job: Job, item=None) -> None:
        del self.active[handle]
        if item is not None:
            job.put(item)
        job.put(("done", None))
        self.request_s += 0.2 * ((time.perf_counter() - job.started) - self.request_s)

    def _run(self) -> None:
        while True:
            with self.lock:
                self._admit()
                if not self.active:
                    if self.stopping:
                        return
                    self.lock.wait(0.25)
                    continue
            for handle, job in list(self.active.items()):
                if job.cancel.is_set():  # client went away, or the grace ran out: the slot is free
                    self.engine.cancel(handle)
                    self._finish(handle, job, ("error", CUT) if self.stopping else None)
            if not self.active:
                continue
            try:
                events = self.engine.step()
            except Exception as exc:  # reported to the clients as a 500; the worker keeps serving
                for handle, job in list(self.active.items()):
                    self.engine.cancel(handle)
                    self._finish(handle, job, ("error", exc))
                continue
            for handle, event in events:
                job = self.active[handle]
                self.metrics.observe_step(event.step)
                job.put(("event", event))
                if event.finish_reason is not None:
                    self._finish(handle, job)
            self.metrics.running.set(len(self.active))
