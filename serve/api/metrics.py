"""Prometheus metrics of the server: latencies and counts observed by the API layer, engine gauges
read from ``Engine.stats()`` at scrape time (so a scrape never races the engine loop's updates).

Served as text at ``/metrics`` on the HTTP port.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Latency buckets in seconds: CPU test models take 10-100 ms per token, GPUs 5-50 ms.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _EngineCollector:
    def __init__(self, stats: Callable, active: Callable[[], int]):
        self._stats, self._active = stats, active

    def collect(self):
        s = self._stats()
        for name, doc, value in (
                ("kestrel_queue_depth", "Requests waiting for admission to the engine.", s.num_waiting),
                ("kestrel_running_requests", "Requests the engine is generating for.", s.num_running),
                ("kestrel_active_responses", "Responses open in the API layer (running or queued).",
                 self._active()),
                ("kestrel_kv_pages_in_use", "KV-cache pages in use (all layer groups).", sum(s.pages_in_use)),
                ("kestrel_kv_pages_free", "Free KV-cache pages (all layer groups).", sum(s.pages_free)),
                ("kestrel_prefix_cache_hit_rate", "Prefix-cache hits per lookup since start.", s.prefix_hit_rate),
                ("kestrel_output_tokens_per_second", "Output tokens per second of engine busy time.",
                 s.output_tokens_per_s),
                ("kestrel_stored_responses", "Responses kept for previous_response_id.", s.num_stored_responses),
                ("kestrel_preemptions", "Requests preempted since start.", s.num_preemptions),
                ("kestrel_spec_decode_draft_tokens", "Speculative draft tokens verified since start.",
                 s.num_draft_tokens),
                ("kestrel_spec_decode_accepted_tokens", "Speculative draft tokens accepted since start.",
                 s.num_accepted_tokens)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g


class ServerMetrics:
    """The server's metrics in their own registry (several servers may share a process in tests)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kestrel_time_to_first_token_seconds", "Time from request to its first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("kestrel_inter_token_latency_seconds", "Time between streamed tokens.",
                                     buckets=_ITL_BUCKETS, registry=r)
        self.responses = Counter("kestrel_responses", "Finished responses by status.", ["status"], registry=r)
        self.output_tokens = Counter("kestrel_output_tokens", "Tokens generated.", registry=r)
        self.rejected = Counter("kestrel_rejected_requests", "Requests refused because the queue was full.",
                                registry=r)
        self.tool_runs = Counter("kestrel_builtin_tool_runs", "Built-in tool executions.", ["tool", "outcome"],
                                 registry=r)
        self.requests = Counter("kestrel_rpc_requests", "Requests by RPC and status code.", ["rpc", "code"],
                                registry=r)

    def watch_engine(self, stats: Callable, active: Callable[[], int]) -> None:
        """Adds the engine gauges, read by calling ``stats()`` at each scrape."""
        self.registry.register(_EngineCollector(stats, active))

    def render(self) -> bytes:
        return generate_latest(self.registry)
