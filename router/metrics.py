"""Prometheus metrics named like vLLM's, under a `disagg:` prefix, in a registry per server."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LAT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
        80.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, L = self.registry, ["model_name"]
        self.ttft = Histogram("disagg:time_to_first_token_seconds", "Time to first token.", L,
                              buckets=_LAT, registry=r).labels(model_name)
        self.itl = Histogram("disagg:inter_token_latency_seconds", "Time between output tokens.", L,
                             buckets=_LAT, registry=r).labels(model_name)
        self.e2e = Histogram("disagg:e2e_request_latency_seconds", "End-to-end request latency.", L,
                             buckets=_LAT, registry=r).labels(model_name)
        self.prompt_tokens = Counter("disagg:prompt_tokens", "Prompt tokens processed.", L,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("disagg:generation_tokens", "Generated tokens.", L,
                                         registry=r).labels(model_name)
        self.request_success = Counter("disagg:request_success", "Finished requests by reason.",
                                       L + ["finished_reason"], registry=r)
        self.running = Gauge("disagg:num_requests_running", "Requests in the running batch.", L,
                             registry=r).labels(model_name)
        self.waiting = Gauge("disagg:num_requests_waiting", "Requests waiting to be scheduled.", L,
                             registry=r).labels(model_name)
        self.kv_usage = Gauge("disagg:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", L,
                              registry=r).labels(model_name)
        self.predictor_error = Histogram(
            "disagg:predicted_length_abs_error_tokens", "Absolute error of the response-length prediction.", L,
            buckets=(4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r).labels(model_name)
        self.errors = Counter("disagg:request_errors", "Requests answered with an error, by HTTP status.",
                              L + ["status"], registry=r)
        self.phase = Histogram("disagg:request_phase_seconds",
                               "A disaggregated request's way to its second token, by phase (disagg/deploy/hops.py).",
                               L + ["phase"], buckets=_LAT, registry=r)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phase.labels(self.model_name, phase).observe(seconds)

    def add_transfer_source(self, read: Callable[[], dict]) -> None:
        """KV-transfer totals reported by the workers (disaggregated mode), exported as counters."""
        self.registry.register(_TransferCollector(self.model_name, read))

    def add_prefix_cache_source(self, read: Callable[[], list[dict]]) -> None:
        """Prefix-cache counters per worker: read() -> [{"worker", "role", "queries", "hits"}], tokens."""
        self.registry.register(_PrefixCacheCollector(self.model_name, read))

    def finished(self, reason: str) -> None:
        self.request_success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TransferCollector:
    def __init__(self, model_name: str, read: Callable[[], dict]):
        self.model_name, self.read = model_name, read

    def collect(self):
        t = self.read() or {}
        b = CounterMetricFamily("disagg:kv_transfer_bytes", "KV bytes moved between prefill and decode workers: "
                                "raw = uncompressed equivalent, wire = after the codec.", labels=["model_name", "stage"])
        b.add_metric([self.model_name, "raw"], t.get("bytes_raw", 0))
        b.add_metric([self.model_name, "wire"], t.get("bytes_wire", 0))
        yield b
        for key, name, doc in (("seconds", "kv_transfer_seconds", "Time from a transfer plan posted to its KV landed."),
                               ("plans", "kv_transfer_plans", "Completed KV transfer plans (one per batch and pair)."),
                               ("failures", "kv_transfer_failures",
                                "Transfers whose checksum failed (the prompt was recomputed on the decode side)."),
                               ("local_prefills", "local_prefills",
                                "Requests prefilled on their decode worker (conditional disaggregation: no transfer).")):
            c = CounterMetricFamily(f"disagg:{name}", doc, labels=["model_name"])
            c.add_metric([self.model_name], t.get(key, 0))
            yield c
        r = CounterMetricFamily("disagg:worker_restarts", "Dead workers that Ray restarted and the pool re-admitted.",
                                labels=["model_name", "role"])
        for role, n in sorted(t.get("worker_restarts", {}).items()):
            r.add_metric([self.model_name, role], n)
        yield r
        yield GaugeMetricFamily("disagg:dead_workers", "Workers dead now (restarting or given up).",
                                value=t.get("dead_workers", 0))


class _PrefixCacheCollector:
    """vLLM's prefix_cache_queries / prefix_cache_hits (tokens), one series per worker."""

    def __init__(self, model_name: str, read: Callable[[], list[dict]]):
        self.model_name, self.read = model_name, read

    def collect(self):
        rows = self.read() or []
        for key, doc in (("queries", "Prompt tokens looked up in the prefix cache, per worker."),
                         ("hits", "Of the prompt tokens looked up, those found in the prefix cache (not computed, "
                                  "or on a decode worker not transferred), per worker.")):
            c = CounterMetricFamily(f"disagg:prefix_cache_{key}", doc, labels=["model_name", "worker", "role"])
            for r in rows:
                c.add_metric([self.model_name, str(r["worker"]), r["role"]], r.get(key, 0))
            yield c
