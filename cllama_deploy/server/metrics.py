"""Prometheus metrics for /metrics, in a registry owned by the app (several apps may share a process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector:
    """Reads queue depth, running jobs and cancellations from the engines at scrape time."""

    def __init__(self, engines: Callable[[], list]):
        self._engines = engines

    def collect(self):
        queue = GaugeMetricFamily("cllama_queue_depth", "Requests waiting for the model", labels=["model"])
        running = GaugeMetricFamily("cllama_requests_running", "Requests generating now",
                                    labels=["model"])
        cancelled = CounterMetricFamily("cllama_generations_cancelled",
                                        "Generations stopped because the client went away",
                                        labels=["model"])
        for engine in self._engines():
            stats = engine.stats()
            queue.add_metric([engine.info.id], stats.get("queue_depth", 0))
            running.add_metric([engine.info.id], stats.get("running", 0))
            cancelled.add_metric([engine.info.id], stats.get("cancelled", 0))
        yield queue
        yield running
        yield cancelled


class Metrics:
    def __init__(self, engines: Callable[[], list]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cllama_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.duration = Histogram("cllama_request_duration_seconds", "HTTP request duration",
                                  ["endpoint"], registry=r,
                                  buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.prompt_tokens = Counter("cllama_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("cllama_completion_tokens", "Tokens generated", ["model"],
                                         registry=r)
        self.ttft = Histogram("cllama_time_to_first_token_seconds",
                              "Time from accepting a request to its first generated token (queue "
                              "wait and prompt evaluation included)", ["model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tps = Histogram("cllama_generation_tokens_per_second",
                             "Decode speed of each generation (tokens after the first / seconds)",
                             ["model"], registry=r,
                             buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 5000))
        self.stream_errors = Counter("cllama_stream_errors", "Streams ended by an error event",
                                     ["model"], registry=r)
        r.register(_EngineCollector(engines))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)

    def observe_generation(self, model: str, chunk) -> None:
        """Record a finished generation from its final chunk."""
        if chunk.usage is not None:
            self.prompt_tokens.labels(model).inc(chunk.usage.prompt_tokens)
            self.completion_tokens.labels(model).inc(chunk.usage.completion_tokens)
        if chunk.time_to_first_token is not None:
            self.ttft.labels(model).observe(chunk.time_to_first_token)
        if chunk.tokens_per_second is not None:
            self.tps.labels(model).observe(chunk.tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
