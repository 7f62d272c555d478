"""Prometheus metrics of ``alaya serve`` (one registry per server; ``prometheus_client``)."""

from __future__ import annotations

from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from alaya_jax.server.scheduler import Observer

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics(Observer):
    """Counters and histograms fed by the HTTP gate and the engine loop; gauges read at scrape time."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("alaya_http_requests", "HTTP requests by path and status", ["path", "status"],
                                registry=r)
        self.errors = Counter("alaya_http_errors", "HTTP responses with status >= 400 by path and status",
                              ["path", "status"], registry=r)
        self.completions = Counter("alaya_completions", "generations finished, by finish reason", ["finish_reason"],
                                   registry=r)
        self.prompt_tokens = Counter("alaya_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("alaya_generated_tokens", "tokens generated", registry=r)
        self.reused_tokens = Counter("alaya_reused_tokens", "prompt tokens served from stored contexts", registry=r)
        self.context_hits = Counter("alaya_context_hits", "generations that reused a stored context, by source "
                                    "(memory:device, memory:pinned_host, disk)", ["source"], registry=r)
        self.ttft = Histogram("alaya_ttft_seconds", "request arrival to first token", buckets=_TTFT_BUCKETS,
                              registry=r)
        self.token_latency = Histogram("alaya_token_latency_seconds", "time between a sequence's tokens",
                                       buckets=_TOKEN_BUCKETS, registry=r)
        self.active = Gauge("alaya_active_sequences", "sequences in the decode batch", registry=r)
        self.waiting = Gauge("alaya_waiting_requests", "jobs waiting for the engine loop", registry=r)
        self.slots = Gauge("alaya_batch_slots", "slots of the decode batch", registry=r)
        self.tier_bytes = Gauge("alaya_memory_tier_bytes", "bytes held by the context DB's memory tier", registry=r)
        self.tier_budget = Gauge("alaya_memory_tier_budget_bytes", "the memory tier's byte budget", registry=r)
        self.tier_snapshots = Gauge("alaya_memory_tier_snapshots", "contexts resident in the memory tier",
                                    registry=r)

    # HTTP gate
    def request(self, path: str, status: int) -> None:
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()

    # engine loop (Observer)
    def first_token(self, ttft_s: float, reused_tokens: int, source: Optional[str]) -> None:
        self.ttft.observe(ttft_s)
        if reused_tokens:
            self.reused_tokens.inc(reused_tokens)
            self.context_hits.labels(source or "unknown").inc()

    def token(self, latency_s: float) -> None:
        self.token_latency.observe(latency_s)

    def finished(self, job, usage: dict, finish_reason: str) -> None:
        self.completions.labels(finish_reason).inc()
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generated_tokens.inc(usage["completion_tokens"])

    def render(self, load: dict, db) -> tuple[bytes, str]:
        self.active.set(load["active"])
        self.waiting.set(load["waiting"])
        self.slots.set(load["batch_slots"])
        if db is not None and not db.catalog_only:
            st = db.memory_stats()
            self.tier_bytes.set(st.used_bytes)
            self.tier_budget.set(st.budget_bytes)
            self.tier_snapshots.set(len(st.snapshots))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
