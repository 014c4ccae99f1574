"""Prometheus metrics under `kubellm:`, named as vLLM's `vllm:` ones are.

Engine state (running/waiting requests, KV usage, preemptions, prefix-cache
counters) is read when scraped; per-request latencies and token counts are
observed as responses stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kubellm.runtime.core.async_engine import AsyncEngine
from kubellm.runtime.core.outputs import StepDelta

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class _EngineState:
    """A collector that reads the engine's own counters at scrape time (none while loading)."""

    def __init__(self, engine: Callable[[], AsyncEngine | None], model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self):
        engine = self.engine()
        if engine is None:
            return
        stats = engine.stats  # the step thread's last snapshot
        gauges = {
            "num_requests_running": ("Requests in the running batch", stats.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled", stats.num_waiting),
            "kv_cache_usage_perc": ("Fraction of KV blocks in use (1 = full)", stats.kv_usage),
        }
        counters = {
            "num_preemptions": ("Preemptions of running requests", stats.num_preemptions),
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache",
                stats.prefix_cache_queries,
            ),
            "prefix_cache_hits": (
                "Prompt tokens found in the prefix cache",
                stats.prefix_cache_hits,
            ),
        }
        for family, metrics in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, (documentation, value) in metrics.items():
                metric = family(f"kubellm:{name}", documentation, labels=["model_name"])
                metric.add_metric([self.model_name], value)
                yield metric
        # vLLM's cache_config_info (what a Gateway API endpoint picker reads), value 1
        labels = ["model_name", "block_size", "num_gpu_blocks"]
        config = GaugeMetricFamily(
            "kubellm:cache_config_info", "The KV cache's configuration", labels=labels
        )
        config.add_metric([self.model_name, str(stats.block_size), str(stats.num_blocks)], 1)
        yield config


class ServerMetrics:
    def __init__(self, engine: Callable[[], AsyncEngine | None], model_name: str) -> None:
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
        self.queue = self._histogram(
            "request_queue_time_seconds", "Time from arrival until first scheduled"
        )

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(
            f"kubellm:{name}", documentation, ["model_name", *labels], registry=self.registry
        )

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            f"kubellm:{name}",
            documentation,
            ["model_name"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )

    def count_aborted(self, num_sequences: int) -> None:
        """Sequences stopped before they finished (a client that hung up, a shutdown)."""
        if num_sequences:
            self.request_success.labels(self.model_name, "abort").inc(num_sequences)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(
        self, stream: AsyncIterator[tuple[int, StepDelta]], n: int
    ) -> AsyncIterator[tuple[int, StepDelta]]:
        """Pass a request's (choice, delta) pairs through, timing them. Per prompt: time to
        first token, queue time, prompt tokens, and end-to-end latency once its n sequences
        are done; per sequence: the time between its tokens."""
        name = self.model_name
        started = time.perf_counter()
        last_token: dict[int, float] = {}  # choice -> when its last token came
        finished_per_prompt: dict[str, int] = {}
        async for choice, delta in stream:
            now = time.perf_counter()
            prompt_seen = delta.request_id in finished_per_prompt
            if not prompt_seen:
                finished_per_prompt[delta.request_id] = 0
                self.ttft.labels(name).observe(now - started)
                self.queue.labels(name).observe(delta.queue_seconds)
                self.prompt_tokens.labels(name).inc(delta.num_prompt_tokens)
            elif choice in last_token:
                self.itl.labels(name).observe(now - last_token[choice])
            last_token[choice] = now
            self.generation_tokens.labels(name).inc(len(delta.new_token_ids))
            if delta.finish_reason is not None:
                self.request_success.labels(name, delta.finish_reason).inc()
                finished_per_prompt[delta.request_id] += 1
                if finished_per_prompt[delta.request_id] == n:
                    self.e2e.labels(name).observe(now - started)
            yield choice, delta
