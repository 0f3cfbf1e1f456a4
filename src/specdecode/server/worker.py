"""The worker: one decoder serves one generation at a time (its KV caches are shared state), on a
thread off the event loop, from a bounded queue."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from ..config import GenerationConfig
from ..engine import SpeculativeDecoder
from .metrics import Metrics
from .requests import RequestError


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
