"""The engine's Prometheus metrics (prometheus_client), one registry per engine.

A server exposes `EngineMetrics.registry` on its metrics endpoint (or passes its own
registry in); tests read the same objects to show that steps really shared a forward.
Names (all prefixed `lambdasplit_engine_`):

    batches_total             forwards run
    rows_total                steps (or step pieces, for chunked prefills) run in them
    shared_rows_total         rows that ran in a forward together with another session's row
    positions_total           positions run
    batch_rows                histogram: rows per forward (the batch size)
    batch_positions           histogram: positions per forward
    forward_seconds           histogram: time of one batched forward
    step_seconds              histogram: submit -> result of one step
    admission_wait_seconds    histogram: time a new session waited for KV budget
    admission_queue           gauge: sessions waiting for KV budget now
    sessions                  gauge: open sessions
    kv_budget_bytes           gauge: the server-wide KV budget
    kv_reserved_bytes         gauge: KV bytes reserved by open sessions
    kv_used_bytes             gauge: KV bytes their caches hold
    refusals_total{reason}    sessions or steps refused (queue_full, queue_timeout, client_kv_limit,
                              over_budget, reservation_exceeded, gap, bad_shape, too_many_pending,
                              closed, bad_request)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "lambdasplit_engine_"
_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)
_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batches = Counter(PREFIX + "batches", "batched forwards run", registry=r)
        self.rows = Counter(PREFIX + "rows", "rows (session steps or prefill chunks) run", registry=r)
        self.shared_rows = Counter(PREFIX + "shared_rows", "rows run in a forward with another session's row",
                                   registry=r)
        self.positions = Counter(PREFIX + "positions", "positions run", registry=r)
        self.batch_rows = Histogram(PREFIX + "batch_rows", "rows per forward", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_positions = Histogram(PREFIX + "batch_positions", "positions per forward", buckets=_SIZE_BUCKETS,
                                         registry=r)
        self.forward_seconds = Histogram(PREFIX + "forward_seconds", "time of one batched forward",
                                         buckets=_TIME_BUCKETS, registry=r)
        self.step_seconds = Histogram(PREFIX + "step_seconds", "submit to result of one step", buckets=_TIME_BUCKETS,
                                      registry=r)
        self.admission_wait = Histogram(PREFIX + "admission_wait_seconds", "time a new session waited for KV budget",
                                        buckets=_TIME_BUCKETS, registry=r)
        self.admission_queue = Gauge(PREFIX + "admission_queue", "sessions waiting for KV budget", registry=r)
        self.sessions = Gauge(PREFIX + "sessions", "open sessions", registry=r)
        self.kv_budget = Gauge(PREFIX + "kv_budget_bytes", "server-wide KV budget", registry=r)
        self.kv_reserved = Gauge(PREFIX + "kv_reserved_bytes", "KV bytes reserved by open sessions", registry=r)
        self.kv_used = Gauge(PREFIX + "kv_used_bytes", "KV bytes held by open sessions' caches", registry=r)
        self.refusals = Counter(PREFIX + "refusals", "sessions or steps refused", ["reason"], registry=r)

    def value(self, name: str, **labels) -> float:
        """A sample's current value by its exposed name (e.g. 'lambdasplit_engine_rows_total')."""
        found = self.registry.get_sample_value(name, labels or None)
        return 0.0 if found is None else found
