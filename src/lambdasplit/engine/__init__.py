"""The body server's engine: many sessions' steps in one batched forward.

    packed.py     PackedStack: one forward over the steps of many sessions (packed rows,
                  per-session caches and attention, the family's own layers), exact
    engine.py     Engine and EngineSession: submit steps, a step loop batching them
                  (SARATHI-style chunked prefill), futures for the results
    admission.py  KVBudget: server-wide KV budget reserved at admission, per-client limits,
                  a bounded wait queue; EngineError (refusals with a code)
    metrics.py    EngineMetrics: prometheus_client counters, gauges and histograms
"""

from lambdasplit.engine.admission import EngineError, KVBudget
from lambdasplit.engine.engine import Engine, EngineSession, kv_bytes_per_position
from lambdasplit.engine.metrics import EngineMetrics
from lambdasplit.engine.packed import PackedStack, Row

__all__ = ["Engine", "EngineSession", "EngineError", "EngineMetrics", "KVBudget", "PackedStack", "Row",
           "kv_bytes_per_position"]
