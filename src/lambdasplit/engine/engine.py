"""The engine: sessions submit steps, one loop runs the pending steps of all sessions together.

    session = engine.open_session(client="10.0.0.7", max_positions=512)   # reserves KV
    future = session.submit(start, hidden)      # hidden [1, n, D] for positions start..start+n-1
    out = future.result()                        # [1, n, D]; asyncio: asyncio.wrap_future(future)
    session.close()                              # frees the cache and the reservation

A step is the only operation: decode (n = 1), prefill (n = prompt length), a
speculative verify of k positions, a replay after failover (n = everything sent so far),
and a cut-back (start < the session's length: the cache is cut back to `start` first,
as `LayerStack.forward` does). A tree step (`parents`, llm/tree.py) verifies a whole draft
tree: it runs unchunked with its tree mask, and the next step names the path to keep
(`keep`), which compacts the cache before that step runs. Steps of one session run in the order submitted; a step
may start anywhere up to where the session's previous steps will have left it.

The step loop (one thread) repeatedly takes the pending steps of all sessions and runs
one `PackedStack.forward` over them, SARATHI-style (decode-maximal, chunked prefill):

* at most `max_batch` rows (one per session) and `prefill_chunk + max_batch` positions
  per forward, so every decode row fits beside one full prefill chunk;
* rows are taken shortest remaining step first (decodes, then verify steps, then
  prefills), oldest first among equals; a step longer than `prefill_chunk` runs in
  chunks of at most `prefill_chunk` positions over successive forwards, sharing each one
  with the decode rows, so a long prompt does not stall everyone's tokens;
* a step's result is delivered when its last chunk has run.

The engine knows nothing of heads, tails or wire formats: it runs a stack of decoder
layers over hidden states, so a body server and a cloud-mode server (the whole stack)
use it alike.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future

import torch

from lambdasplit.engine.admission import EngineError, KVBudget
from lambdasplit.engine.metrics import EngineMetrics
from lambdasplit.engine.packed import PackedStack, Row
from lambdasplit.errors import LambdaSplitError
from lambdasplit.llm import tree
from lambdasplit.llm.segments import LayerStack


def kv_bytes_per_position(stack: LayerStack) -> int:
    """KV bytes one position takes in every layer of `stack` (keys and values)."""
    config = stack.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = [p for layer in stack.layers for p in layer.parameters()][:1]
    element = params[0].element_size() if params else 4
    return 2 * len(stack.layers) * heads * head_dim * element


class _Step:
    __slots__ = ("session", "start", "hidden", "parents", "keep", "done", "pieces", "future", "submitted",
                 "waiting_since")

    def __init__(self, session, start: int, hidden: torch.Tensor, parents=None, keep=None):
        self.session, self.start, self.hidden = session, start, hidden
        self.parents = parents  # a tree step (llm/tree.py); it runs whole, never chunked
        self.keep = keep  # (start, offsets): the previous step's entries to keep before this one runs
        self.done = 0  # positions already run (chunked prefill)
        self.pieces: list[torch.Tensor] = []
        self.future: Future = Future()
        self.submitted = self.waiting_since = time.perf_counter()

    @property
    def remaining(self) -> int:
        return self.hidden.shape[1] - self.done


class EngineSession:
    """One session's handle: its cache lives in the engine; it submits steps."""

    def __init__(self, engine: "Engine", session_id: int, client: str, max_positions: int, reserved_bytes: int):
        self.engine, self.id, self.client = engine, session_id, client
        self.max_positions, self.reserved_bytes = max_positions, reserved_bytes
        self.stack = engine.packed.new_session()
        self.length = 0  # where the steps submitted so far leave the cache
        self.closed = False
        self.pending: list[_Step] = []  # engine lock
        self.last: tuple[int, int, list[int] | None] | None = None  # the last step submitted: start, n, parents

    def submit(self, start: int, hidden: torch.Tensor, parents: list[int] | None = None,
               keep: list[int] | None = None) -> Future:
        """Run hidden states [1, n, D] for positions start..start+n-1; a Future of the outputs [1, n, D].

        `parents`: a tree step (llm/tree.py). `keep`: first keep only these offsets of the previous
        step (a root-to-node path of its tree), at its start onwards: the cut-back after a tree step.
        """
        return self.engine._submit(self, start, hidden, parents, keep)

    def step(self, start: int, hidden: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        return self.submit(start, hidden).result(timeout)

    def close(self) -> None:
        self.engine._close(self)

    def __enter__(self) -> "EngineSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine:
    """The steps of every session of one layer stack, batched. Start it, open sessions, stop it."""

    def __init__(self, stack: LayerStack, *, max_batch: int = 16, prefill_chunk: int = 64,
                 kv_budget_mb: float = 1024.0, per_client_kv_mb: float | None = None,
                 queue_timeout: float = 10.0, max_queue: int = 64, max_pending_steps: int = 8,
                 metrics: EngineMetrics | None = None):
        if max_batch < 1 or prefill_chunk < 1:
            raise LambdaSplitError(f"max_batch and prefill_chunk must be >= 1, got {max_batch} and {prefill_chunk}")
        self.packed = PackedStack(stack)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.max_positions_per_batch = prefill_chunk + max_batch
        self.max_pending_steps = max_pending_steps  # per session: steps queued but not yet run
        self.metrics = metrics or EngineMetrics()
        self.per_position_bytes = kv_bytes_per_position(stack)
        self.budget = KVBudget(
            int(kv_budget_mb * 2**20), per_client_bytes=None if per_client_kv_mb is None else int(per_client_kv_mb * 2**20),
            queue_timeout=queue_timeout, max_queue=max_queue, metrics=self.metrics,
        )
        self.dtype = next((p.dtype for layer in stack.layers for p in layer.parameters()), torch.float32)
        self._ids = itertools.count(1)
        self._sessions: dict[int, EngineSession] = {}
        self._queue: list[EngineSession] = []  # sessions with pending steps, in order of their oldest one
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lambdasplit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for session in list(self._sessions.values()):
            session.close()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ sessions

    def open_session(self, client: str = "local", max_positions: int = 2048) -> EngineSession:
        """Admit a session that may hold up to `max_positions` positions; waits for KV budget if needed."""
        if max_positions < 1:
            raise EngineError("bad_request", f"max_positions must be >= 1, got {max_positions}")
        nbytes = max_positions * self.per_position_bytes
        self.budget.reserve(client, nbytes)  # may wait, may raise EngineError
        session = EngineSession(self, next(self._ids), client, max_positions, nbytes)
        with self._lock:
            self._sessions[session.id] = session
            self.metrics.sessions.set(len(self._sessions))
        return session

    def _close(self, session: EngineSession) -> None:
        with self._lock:
            if session.closed:
                return
            session.closed = True
            for step in session.pending:
                step.future.set_exception(EngineError("closed", "the session was closed before this step ran"))
            session.pending.clear()
            if session in self._queue:
                self._queue.remove(session)
            self._sessions.pop(session.id, None)
            self.metrics.sessions.set(len(self._sessions))
            self._update_used()
        self.budget.release(session.client, session.reserved_bytes)

    def _update_used(self) -> None:
        self.metrics.kv_used.set(sum(s.stack.length for s in self._sessions.values()) * self.per_position_bytes)

    # ------------------------------------------------------------ steps

    def _refuse(self, reason: str, message: str) -> Future:
        self.metrics.refusals.labels(reason=reason).inc()
        future: Future = Future()
        future.set_exception(EngineError(reason, message))
        return future

    def _submit(self, session: EngineSession, start: int, hidden: torch.Tensor, parents=None, keep=None) -> Future:
        d = self.packed.hidden_size
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] != 1 \
                or hidden.shape[1] < 1 or hidden.shape[2] != d:
            shape = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            return self._refuse("bad_shape", f"expected hidden states of shape [1, n, {d}], got {shape}")
        n = hidden.shape[1]
        with self._lock:
            if session.closed or self._stopping:
                return self._refuse("closed", "this session is closed")
            if len(session.pending) >= self.max_pending_steps:
                return self._refuse("too_many_pending", f"this session already has {len(session.pending)} steps "
                                                        f"waiting; the limit is {self.max_pending_steps}")
            problem = tree.parents_problem(parents, n) if parents is not None else None
            kept_length = session.length
            if keep is not None and problem is None:
                if session.last is None:
                    problem = "keep names entries of a previous step, and there is none"
                else:
                    problem = tree.keep_problem(keep, session.last[2], session.last[1])
                    kept_length = session.last[0] + len(keep)
            elif session.last is not None and session.last[2] is not None and problem is None:
                last_start, _, last_parents = session.last
                if start > last_start and not tree.is_chain(last_parents[:start - last_start]):
                    problem = (f"after a tree step, a step at {start} would keep offsets 0..{start - last_start - 1}"
                               f" of it, which are not one path: name the kept path with keep")
            if problem is not None:
                return self._refuse("bad_step", problem)
            if not 0 <= start <= kept_length:
                return self._refuse("gap", f"step starts at position {start} but the session's steps so far "
                                           f"reach position {kept_length}")
            if start + n > session.max_positions:
                return self._refuse("reservation_exceeded",
                                    f"positions up to {start + n} exceed the {session.max_positions} this session "
                                    f"reserved")
            step = _Step(session, start, hidden.to(self.dtype), parents,
                         (session.last[0], keep) if keep is not None else None)
            session.last = (start, n, parents)
            session.length = start + n
            session.pending.append(step)
            if len(session.pending) == 1:
                self._queue.append(session)
            self._lock.notify_all()
        return step.future

    def _take_batch(self) -> list[tuple[_Step, int]]:
        """(step, positions to run now) for the next forward; under the lock."""
        heads = sorted((s.pending[0] for s in self._queue), key=lambda st: (st.remaining, st.waiting_since))
        batch, positions = [], 0
        for step in heads:
            if len(batch) == self.max_batch:
                break
            if step.parents is not None:  # a tree step runs whole: its mask spans all its positions
                take = step.remaining
                if batch and positions + take > self.max_positions_per_batch:
                    continue
            else:
                take = min(step.remaining, self.prefill_chunk, self.max_positions_per_batch - positions)
            if take < 1:
                break
            batch.append((step, take))
            positions += take
        return batch

    def run_pending(self) -> int:
        """Run forwards in the caller's thread until no step is pending; the number of forwards.

        For a caller that drives the engine itself (tests, deterministic benches) instead of
        `start()`ing its loop; not to be mixed with a running loop.
        """
        if self._thread is not None:
            raise LambdaSplitError("run_pending() drives an engine whose loop is not running")
        forwards = 0
        while True:
            with self._lock:
                batch = self._take_batch() if self._queue else []
            if not batch:
                return forwards
            self._run(batch)
            forwards += 1

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    for session in self._sessions.values():
                        for step in session.pending:
                            step.future.set_exception(EngineError("closed", "the engine stopped"))
                        session.pending.clear()
                    self._queue.clear()
                    return
                batch = self._take_batch()
            self._run(batch)

    def _run(self, batch: list[tuple[_Step, int]]) -> None:
        # A cut-back is done row by row first: one that cannot be done (a sliding-window
        # layer already dropped those positions) fails that step alone, not its batch.
        failed: dict[int, BaseException] = {}
        for i, (step, _take) in enumerate(batch):
            start, stack = step.start + step.done, step.session.stack
            try:
                if step.keep is not None and step.done == 0:
                    stack.compact(*step.keep)  # after a tree step: its kept path only
                if start != stack.length:
                    stack.truncate(start)
            except LambdaSplitError as cut:
                failed[i] = EngineError("bad_step", str(cut))
        live = [i for i in range(len(batch)) if i not in failed]
        rows = [Row(batch[i][0].session.stack, batch[i][0].start + batch[i][0].done,
                    batch[i][0].hidden[:, batch[i][0].done:batch[i][0].done + batch[i][1]], batch[i][0].parents)
                for i in live]
        began = time.perf_counter()
        outputs: dict[int, torch.Tensor] = {}
        if rows:
            try:
                outputs = dict(zip(live, self.packed.forward(rows)))
            except Exception as failure:  # noqa: BLE001 - handed to every step of this forward
                error = failure if isinstance(failure, LambdaSplitError) else \
                    EngineError("engine_error", f"the batched forward failed: {failure}")
                failed.update({i: error for i in live})
        now = time.perf_counter()
        m = self.metrics
        if rows:
            m.batches.inc()
            m.rows.inc(len(rows))
            if len(rows) > 1:
                m.shared_rows.inc(len(rows))
            m.positions.inc(sum(r.n for r in rows))
            m.batch_rows.observe(len(rows))
            m.batch_positions.observe(sum(r.n for r in rows))
            m.forward_seconds.observe(now - began)
        finished = []  # (step, output or None, error or None)
        with self._lock:
            for i, (step, take) in enumerate(batch):
                session = step.session
                if i in failed or session.closed:
                    finished.append((step, None, failed.get(i)))
                    continue
                step.pieces.append(outputs[i])
                step.done += take
                step.waiting_since = now
                if step.remaining == 0:
                    out = torch.cat(step.pieces, dim=1) if len(step.pieces) > 1 else step.pieces[0]
                    finished.append((step, out, None))
            for step, _, error in finished:
                session = step.session
                if session.pending and session.pending[0] is step:
                    session.pending.pop(0)
                if error is not None:  # the session's later steps assumed this one: fail them too
                    for later in session.pending:
                        later.future.set_exception(EngineError(getattr(error, "code", "engine_error"),
                                                               f"an earlier step failed: {error}"))
                    session.pending.clear()
                    session.length = session.stack.length
                if session in self._queue:
                    self._queue.remove(session)
                if session.pending and not session.closed:
                    self._queue.append(session)
            self._update_used()
        for step, out, error in finished:
            if step.future.done():
                continue
            if out is not None:
                step.future.set_result(out)
                m.step_seconds.observe(now - step.submitted)
            elif error is not None:
                step.future.set_exception(error)
            else:
                step.future.set_exception(EngineError("closed", "the session was closed before this step ran"))
