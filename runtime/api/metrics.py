"""Prometheus metrics under `kubellm:`, named as vLLM's `vllm:` ones are.

Engine state (running/waiting requests, KV usage, preemptions, prefix-cache
counters) is read when scraped; per-request latencies and token counts are
observed as responses stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kubellm.runtime.async_engine import AsyncEngine
from kubellm.runtime.outputs import StepDelta

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class _EngineState:
    """A collector that reads the engine's own counters at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        scheduler, kv = self.engine.engine.scheduler, self.engine.engine.kv
        gauges = {
            "num_requests_running": ("Requests in the running batch", len(scheduler.running)),
            "num_requests_waiting": ("Requests waiting to be scheduled", len(scheduler.waiting)),
            "kv_cache_usage_perc": (
                "Fraction of KV blocks in use (1 = full)",
                1 - kv.num_free_blocks / kv.num_blocks,
            ),
        }
        counters = {
            "num_preemptions": ("Preemptions of running requests", scheduler.num_preemptions),
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache",
                kv.prefix_queries,
            ),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", kv.prefix_hits),
        }
        for family, metrics in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, (documentation, value) in metrics.items():
                metric = family(f"kubellm:{name}", documentation, labels=["model_name"])
                metric.add_metric([self.model_name], value)
                yield metric


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(engine, model_name))
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated")
        self.request_success = self._counter(
            "request_success", "Finished requests", "finished_reason"
        )
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token")
        self.itl = self._histogram("inter_token_latency_seconds", "Time between tokens")
        self.e2e = self._histogram("e2e_request_latency_seconds", "Request latency")

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(
            f"kubellm:{name}", documentation, ["model_name", *labels], registry=self.registry
        )

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            f"kubellm:{name}", documentation, ["model_name"], registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(self, deltas: AsyncIterator[StepDelta]) -> AsyncIterator[StepDelta]:
        """Pass the deltas through, timing them; count the request when it ends."""
        name = self.model_name
        started = last = time.perf_counter()
        first = True
        reasons: list[str] = []
        async for delta in deltas:
            now = time.perf_counter()
            (self.ttft if first else self.itl).labels(name).observe(
                now - (started if first else last)
            )
            if first:
                self.prompt_tokens.labels(name).inc(delta.num_prompt_tokens)
            first, last = False, now
            self.generation_tokens.labels(name).inc(len(delta.new_token_ids))
            if delta.finish_reason is not None:
                reasons.append(delta.finish_reason)
            yield delta
        self.e2e.labels(name).observe(time.perf_counter() - started)
        for reason in reasons:
            self.request_success.labels(name, reason).inc()
