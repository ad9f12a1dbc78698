"""Prometheus metrics for /metrics, in a registry owned by the app (several apps may share a process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector:
    """Reads each engine's ``stats()`` at scrape time: slots, queue, cancellations, the prefix cache
    (prompt tokens served from it vs computed), KV cells, and the batch size of each decode step."""

    GAUGES = (
        ("queue_depth", "cllama_queue_depth", "Requests waiting for a free slot"),
        ("running", "cllama_requests_running", "Sequences generating now (slots in use)"),
        ("slots_used", "cllama_slots_used", "Slots in use (sequences being decoded)"),
        ("slots_total", "cllama_slots_total", "Slots (--parallel)"),
        ("kv_cells_used", "cllama_kv_cells_used", "KV cache cells holding tokens of running sequences"),
        ("kv_cells_total", "cllama_kv_cells_total", "KV cache cells (--parallel x --n-ctx)"),
        ("prefix_cache_entries", "cllama_prefix_cache_entries",
         "Finished sequences whose KV is kept in host memory for prefix reuse"),
        ("prefix_cache_bytes", "cllama_prefix_cache_bytes", "Host memory those hold"),
    )
    COUNTERS = (
        ("cancelled", "cllama_generations_cancelled",
         "Generations stopped because the client went away"),
        ("prompt_tokens_cached", "cllama_prompt_tokens_cached",
         "Prompt tokens whose KV was reused from the prefix cache instead of computed"),
        ("prompt_tokens_computed", "cllama_prompt_tokens_computed", "Prompt tokens decoded"),
        ("steps", "cllama_decode_steps", "llama_decode calls of the batching scheduler"),
        ("decode_seconds", "cllama_decode_seconds", "Seconds spent inside llama_decode"),
        ("step_seconds", "cllama_step_seconds",
         "Seconds of whole scheduler steps (llama_decode + batching, sampling and streaming work)"),
    )
    HISTOGRAMS = (
        ("step_sequences", "cllama_step_sequences", "Sequences carried by each decode step"),
        ("step_tokens", "cllama_step_tokens", "Tokens carried by each decode step"),
    )

    def __init__(self, engines: Callable[[], list]):
        self._engines = engines

    def collect(self):
        gauges = {key: GaugeMetricFamily(name, doc, labels=["model"]) for key, name, doc in self.GAUGES}
        counters = {key: CounterMetricFamily(name, doc, labels=["model"])
                    for key, name, doc in self.COUNTERS}
        hists = {key: HistogramMetricFamily(name, doc, labels=["model"])
                 for key, name, doc in self.HISTOGRAMS}
        for engine in self._engines():
            stats = engine.stats()
            model = [engine.info.id]
            for key, family in gauges.items():
                family.add_metric(model, stats.get(key, 0))
            for key, family in counters.items():
                family.add_metric(model, stats.get(key, 0))
            for key, family in hists.items():
                h = stats.get(key)
                if h:
                    family.add_metric(model, [(_le(b), c) for b, c in h["buckets"]], h["sum"])
        yield from gauges.values()
        yield from counters.values()
        yield from hists.values()


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else str(float(bound))


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
