"""Prometheus metrics under vLLM's names, so existing dashboards work."""

from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format, what /metrics answers


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
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency", buckets=buckets, registry=r
        )
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time spent queued", buckets=buckets, registry=r)
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Steps that drafted at least one token", registry=r)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens", registry=r)
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Accepted drafted tokens", registry=r)
        self.accepted_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by position",
            ["position"],
            registry=r,
        )

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
