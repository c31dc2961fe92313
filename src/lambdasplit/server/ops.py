"""Operating a server: Prometheus metrics, health endpoints and one log line per session.

`serve --metrics-port P` answers on P (plain HTTP, meant for the operator's network):

    /metrics   Prometheus text: the server's `lambdasplit_server_*` figures (below) and every
               hosted engine's `lambdasplit_engine_*` ones (engine/metrics.py), labelled `service`
    /healthz   200 while the process runs
    /readyz    200 once the models are loaded and the server accepts sessions, else 503

Server metrics (docs/deploy.md lists them all; tests/test_ops.py checks that list):

    lambdasplit_server_sessions                 gauge: open sessions
    lambdasplit_server_sessions_started_total   counter{service}: sessions admitted
    lambdasplit_server_sessions_ended_total     counter{service,outcome}: ok | error | dropped (peer stopped reading)
    lambdasplit_server_session_seconds          histogram: how long sessions lasted
    lambdasplit_server_steps_total              counter: frames handled after HELLO (steps, GENERATEs)
    lambdasplit_server_tokens_total             counter: positions run for sessions that ended
    lambdasplit_server_bytes_in_total           counter: bytes received (frames, headers included), live
    lambdasplit_server_bytes_out_total          counter: bytes sent (frames, headers included), live
    lambdasplit_server_errors_total             counter{code}: ERROR frames sent, by protocol error code
    lambdasplit_server_queue_length             gauge: new sessions waiting for KV budget
    lambdasplit_server_queue_wait_seconds       histogram: time a session waited for KV budget
    lambdasplit_server_kv_reserved_bytes        gauge: KV cache granted to open sessions
    lambdasplit_server_kv_used_bytes            gauge: KV cache their caches hold
    lambdasplit_server_ready                    gauge: 1 when /readyz says ready

Session logs go to the logger `lambdasplit.sessions`: "session_start" and "session_end"
with client, service, positions, steps, bytes in/out, seconds and error code, as text or
as one JSON object per line (`--log-format json`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from lambdasplit.errors import LambdaSplitError

PREFIX = "lambdasplit_server_"
session_log = logging.getLogger("lambdasplit.sessions")
_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


def session_positions(handler) -> int | None:
    """Positions a session's cache reached (engine sessions: body and cloud); None for others."""
    length = getattr(getattr(handler, "session", None), "length", None)
    return length if isinstance(length, int) else None


class ServerOps:
    """Metrics, readiness and session logs of one BodyServer (`attach` it once it is built)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.started = Counter(PREFIX + "sessions_started", "sessions admitted", ["service"], registry=r)
        self.ended = Counter(PREFIX + "sessions_ended", "sessions ended, by outcome", ["service", "outcome"],
                             registry=r)
        self.seconds = Histogram(PREFIX + "session_seconds", "how long sessions lasted", buckets=_TIME_BUCKETS,
                                 registry=r)
        self.steps = Counter(PREFIX + "steps", "frames handled after HELLO", registry=r)
        self.tokens = Counter(PREFIX + "tokens", "positions run for sessions that ended", registry=r)
        self.errors = Counter(PREFIX + "errors", "ERROR frames sent, by code", ["code"], registry=r)
        self.queue_wait = Histogram(PREFIX + "queue_wait_seconds", "time a session waited for KV budget",
                                    buckets=_TIME_BUCKETS, registry=r)
        r.register(_LiveCollector(self))
        self.server = None
        self.ready = False
        self.lock = threading.Lock()
        self.live: dict[int, dict] = {}  # session id -> its start info (traffic, handler, service, client)
        self.finished_in = self.finished_out = 0
        self.http: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ wiring
    def attach(self, server) -> "ServerOps":
        self.server = server
        server.session_hooks.append(self.on_session_event)
        server.admission.on_queue_wait = self.queue_wait.observe
        return self

    def set_ready(self, ready: bool = True) -> None:
        self.ready = ready

    # ------------------------------------------------------------ session events (server.py hooks)
    def on_session_event(self, event: str, info: dict) -> None:
        if event == "error":
            self.errors.labels(code=info["code"]).inc()
        elif event == "start":
            with self.lock:
                self.live[info["session"]] = info
            self.started.labels(service=info["service"]).inc()
            session_log.info("session %s start: client %s, service %s", info["session"], info["client"],
                             info["service"], extra={"fields": {
                                 "event": "session_start", "session": info["session"], "client": info["client"],
                                 "service": info["service"]}})
        elif event == "end":
            with self.lock:
                start = self.live.pop(info["session"], {})
                traffic = start.get("traffic")
                bytes_in = getattr(traffic, "bytes_in", 0)
                bytes_out = getattr(traffic, "bytes_out", 0)
                self.finished_in += bytes_in
                self.finished_out += bytes_out
            steps = getattr(traffic, "frames_in", 0)
            positions = session_positions(start.get("handler"))
            error = getattr(traffic, "error", None)
            if error is not None:
                outcome = "error"
            elif traffic is not None and traffic.dropped.is_set():
                outcome, error = "dropped", "dropped"
            else:
                outcome = "ok"
            service = start.get("service", "?")
            self.ended.labels(service=service, outcome=outcome).inc()
            self.seconds.observe(info["seconds"])
            self.steps.inc(steps)
            self.tokens.inc(positions or 0)
            fields = {"event": "session_end", "session": info["session"], "client": info["client"],
                      "service": service, "positions": positions, "steps": steps, "bytes_in": bytes_in,
                      "bytes_out": bytes_out, "seconds": round(info["seconds"], 4), "outcome": outcome,
                      "error": error}
            session_log.info("session %s end: client %s, service %s, %s positions, %d steps, %d B in, %d B out, "
                             "%.3f s, %s%s", info["session"], info["client"], service,
                             "-" if positions is None else positions, steps, bytes_in, bytes_out, info["seconds"],
                             outcome, f" ({error})" if error and error != outcome else "", extra={"fields": fields})

    # ------------------------------------------------------------ HTTP: /metrics /healthz /readyz
    def serve_http(self, host: str, port: int) -> int:
        """Answer on host:port in a daemon thread; returns the port (0 picks a free one)."""
        self.http = serve_http(self.registry, host, port, lambda: self.ready)
        return self.http.server_address[1]

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()


def serve_http(registry, host: str, port: int, is_ready, routes: dict | None = None) -> ThreadingHTTPServer:
    """/metrics (registry), /healthz, /readyz (`is_ready()`) and `routes` {path: () -> (status, body, type)},
    served by a daemon thread."""
    routes = routes or {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                self._reply(200, b"ready\n") if is_ready() else self._reply(503, b"not ready\n")
            elif path in routes:
                self._reply(*routes[path]())
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds: not worth a log line each
            pass

    try:
        http = ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        raise LambdaSplitError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, name="lambdasplit-metrics", daemon=True).start()
    return http


class _LiveCollector:
    """Figures read at scrape time: open sessions, live bytes, KV, queue, and the engines' metrics."""

    def __init__(self, ops: ServerOps):
        self.ops = ops

    def describe(self):
        return []  # collected lazily: the server (and its engines) may not exist yet

    def collect(self):
        ops, server = self.ops, self.ops.server
        with ops.lock:
            live = list(ops.live.values())
            bytes_in = ops.finished_in + sum(getattr(s.get("traffic"), "bytes_in", 0) for s in live)
            bytes_out = ops.finished_out + sum(getattr(s.get("traffic"), "bytes_out", 0) for s in live)
        yield GaugeMetricFamily(PREFIX + "sessions", "open sessions", value=len(live))
        yield CounterMetricFamily(PREFIX + "bytes_in", "bytes received in frames", value=bytes_in)
        yield CounterMetricFamily(PREFIX + "bytes_out", "bytes sent in frames", value=bytes_out)
        yield GaugeMetricFamily(PREFIX + "ready", "1 when the server accepts sessions", value=int(ops.ready))
        admission = getattr(server, "admission", None)
        waiting = len(getattr(admission, "waiting", ()))
        reserved = admission.granted_bytes() if admission is not None else 0
        used = 0
        for s in live:
            try:
                used += s["handler"].memory_bytes()
            except Exception:  # a session closing under us
                pass
        yield GaugeMetricFamily(PREFIX + "queue_length", "new sessions waiting for KV budget", value=waiting)
        yield GaugeMetricFamily(PREFIX + "kv_reserved_bytes", "KV cache granted to open sessions", value=reserved)
        yield GaugeMetricFamily(PREFIX + "kv_used_bytes", "KV cache held by open sessions", value=used)
        yield from self._engines(server)

    @staticmethod
    def _engines(server):
        """Each hosted engine's own registry, re-labelled with the service it runs (several share names)."""
        families: dict[str, Metric] = {}
        for service in getattr(server, "services", ()):
            engine = getattr(service, "engine", None)
            if engine is None:
                continue
            for family in engine.metrics.registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "service": service.description}, sample.value,
                                      sample.timestamp, sample.exemplar)
        yield from families.values()


# ---------------------------------------------------------------- logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: str = "text", prog: str = "lambdasplit serve") -> None:
    """The server's logs on stderr: warnings and errors, plus one line per session start and end."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    session_log.setLevel(logging.INFO)
