"""KV-cache memory reserved at admission: a server-wide budget, per-client limits inside it.

A session declares how many positions it may hold (prompt + new tokens, say) when it
opens; that many positions' KV bytes are reserved for its whole life, so the caches of
admitted sessions can never outgrow the budget. A client over its own limit is refused
at once (waiting would not help it); when the server-wide budget is full, a new session
waits in a bounded FIFO queue for up to `queue_timeout` seconds and is then refused
with a clear error. FIFO: a large request at the head is not overtaken by small ones.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from lambdasplit.engine.metrics import EngineMetrics
from lambdasplit.errors import LambdaSplitError


class EngineError(LambdaSplitError):
    """A session or step the engine refuses; `code` is machine-readable (the server's error code)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class KVBudget:
    def __init__(self, budget_bytes: int, *, per_client_bytes: int | None = None, queue_timeout: float = 10.0,
                 max_queue: int = 64, metrics: EngineMetrics | None = None):
        if budget_bytes <= 0:
            raise LambdaSplitError(f"the KV budget must be positive, got {budget_bytes} bytes")
        self.budget, self.per_client = budget_bytes, per_client_bytes
        self.queue_timeout, self.max_queue = queue_timeout, max_queue
        self.metrics = metrics or EngineMetrics()
        self.metrics.kv_budget.set(budget_bytes)
        self.reserved = 0
        self.by_client: dict[str, int] = {}
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    def _refuse(self, reason: str, message: str) -> EngineError:
        self.metrics.refusals.labels(reason=reason).inc()
        return EngineError(reason, message)

    def reserve(self, client: str, nbytes: int) -> None:
        """Reserve `nbytes` for one session of `client`, waiting in the queue if the budget is full."""
        with self._changed:
            if nbytes > self.budget:
                raise self._refuse("over_budget", f"a session of {_mib(nbytes)} of KV cache exceeds this server's "
                                                  f"whole budget of {_mib(self.budget)}")
            mine = self.by_client.get(client, 0)
            if self.per_client is not None and mine + nbytes > self.per_client:
                raise self._refuse("client_kv_limit", f"{_mib(nbytes)} more KV cache would take this client to "
                                                      f"{_mib(mine + nbytes)}; the limit per client is "
                                                      f"{_mib(self.per_client)}")
            ticket = object()
            if self._waiting or self.reserved + nbytes > self.budget:
                if len(self._waiting) >= self.max_queue:
                    raise self._refuse("queue_full", f"the KV budget ({_mib(self.budget)}) is full and "
                                                     f"{len(self._waiting)} sessions are already waiting")
            began = time.monotonic()
            self._waiting.append(ticket)
            self.metrics.admission_queue.set(len(self._waiting))
            try:
                deadline = began + self.queue_timeout
                while self._waiting[0] is not ticket or self.reserved + nbytes > self.budget:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._refuse("queue_timeout", f"no KV budget freed within {self.queue_timeout:g} s "
                                                            f"({_mib(self.reserved)} of {_mib(self.budget)} "
                                                            f"reserved; this session needs {_mib(nbytes)})")
                    self._changed.wait(left)
            finally:
                self._waiting.remove(ticket)
                self.metrics.admission_queue.set(len(self._waiting))
                self._changed.notify_all()  # the next in line may fit now
            self.metrics.admission_wait.observe(time.monotonic() - began)
            self.reserved += nbytes
            self.by_client[client] = mine + nbytes
            self.metrics.kv_reserved.set(self.reserved)

    def release(self, client: str, nbytes: int) -> None:
        with self._changed:
            self.reserved -= nbytes
            left = self.by_client.get(client, 0) - nbytes
            if left > 0:
                self.by_client[client] = left
            else:
                self.by_client.pop(client, None)
            self.metrics.kv_reserved.set(self.reserved)
            self._changed.notify_all()
