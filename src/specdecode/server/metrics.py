"""Prometheus metrics under vLLM's names, so existing dashboards work."""

from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format, what /metrics answers


class _Named:
    """A metric whose every series carries ``model_name`` (vLLM's dashboards filter on it): the
    metric's own methods for one without other labels, ``labels(...)`` adding it for one with."""

    def __init__(self, metric, model_name: str, other_labels: bool):
        self._metric, self._model_name = metric, model_name
        self._bound = None if other_labels else metric.labels(model_name=model_name)

    def labels(self, **labels):
        return self._metric.labels(model_name=self._model_name, **labels)

    def __getattr__(self, name):  # inc, set, observe, ... of the one series
        return getattr(self._bound, name)


class Metrics:
    def __init__(self, model_name: str = "specdecode"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()

        def named(kind, name, doc, labels=(), **kw):
            return _Named(kind(name, doc, ["model_name", *labels], registry=r, **kw), model_name, bool(labels))

        self.requests = named(Counter, "vllm:request_success", "Finished requests", ["finished_reason"])
        self.failed = named(Counter, "specdecode:request_failed", "Requests that ended in an error", ["status"])
        self.prompt_tokens = named(Counter, "vllm:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = named(Counter, "vllm:generation_tokens", "Tokens generated")
        self.running = named(Gauge, "vllm:num_requests_running", "Requests generating now")
        self.waiting = named(Gauge, "vllm:num_requests_waiting", "Requests queued")
        buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
        self.e2e = named(Histogram, "vllm:e2e_request_latency_seconds", "End-to-end request latency", buckets=buckets)
        self.ttft = named(Histogram, "vllm:time_to_first_token_seconds", "Time to first token", buckets=buckets)
        self.queue_time = named(Histogram, "vllm:request_queue_time_seconds", "Time spent queued", buckets=buckets)
        self.drafts = named(Counter, "vllm:spec_decode_num_drafts", "Steps that drafted at least one token")
        self.draft_tokens = named(Counter, "vllm:spec_decode_num_draft_tokens", "Drafted tokens")
        self.accepted = named(Counter, "vllm:spec_decode_num_accepted_tokens", "Accepted drafted tokens")
        self.accepted_pos = named(Counter, "vllm:spec_decode_num_accepted_tokens_per_pos",
                                  "Accepted drafted tokens by position", ["position"])

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
