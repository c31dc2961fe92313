"""`serve --ray`: body replicas as Ray actors behind one router endpoint.

Each replica is a Ray actor that loads the services and runs a real BodyServer on a
port of its own (on its node's address); this process runs the router (router.py) on
the one address the devices use, places each new session on the least-loaded live
replica and watches the actors: a dead one (killed, crashed, node gone) gets no new
sessions. Without --ray-address a local Ray cluster is started with a small object
store and no dashboard; with one (`auto` after `ray start`), replicas go wherever the
cluster has CPUs (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time

import ray

from lambdasplit.errors import LambdaSplitError
from lambdasplit.server.ops import ServerOps, configure_logging, serve_http
from lambdasplit.server.router import Replica, Router
from lambdasplit.server.server import bind_listener, check_exposure

_OBJECT_STORE_BYTES = 100 * 2**20  # replicas pass nothing through Ray's object store but their addresses


@ray.remote
class BodyReplica:
    """One body server in a Ray worker process; its sessions never leave it."""

    def __init__(self, args, token: str | None, limits, host: str):
        from lambdasplit.server.commands import build_services
        from lambdasplit.server.server import BodyServer

        configure_logging(args.log_format, prog="lambdasplit replica")
        if host == "node":
            host = ray.util.get_node_ip_address()
        check_exposure(host, token, args.tls_cert, args.insecure)
        self.server = BodyServer(build_services(args), host=host, port=0, token=token, tls_cert=args.tls_cert,
                                 tls_key=args.tls_key, insecure=args.insecure, limits=limits)
        self.ops = ServerOps().attach(self.server)
        self.server.start_in_thread()
        self.ops.set_ready()
        self.metrics = None
        if args.metrics_port is not None:  # each replica on a free port of its node; the router lists them
            self.metrics = f"{host}:{self.ops.serve_http(host, 0)}"

    def info(self) -> dict:
        return {"host": self.server.host, "port": self.server.port, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(), "metrics": self.metrics,
                "services": [s.description for s in self.server.services]}

    def ping(self) -> bool:
        return True


def start_ray(address: str | None, num_cpus: int | None) -> None:
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=_OBJECT_STORE_BYTES,
                     include_dashboard=False, log_to_driver=True)
    except Exception as error:  # ConnectionError, RuntimeError... from Ray: one line
        raise LambdaSplitError(f"cannot start or join the Ray cluster ({address or 'local'}): "
                               f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def start_replicas(args, token, limits, count: int) -> list[tuple[object, Replica]]:
    """Start `count` replica actors and wait until each listens (loading the model takes a while)."""
    # Replicas of a local cluster listen on loopback like the router; on a real cluster, on their node.
    host = "127.0.0.1" if not args.ray_address else "node"
    actors = [BodyReplica.options(num_cpus=args.replica_cpus, name=f"lambdasplit-replica-{i}-{os.getpid()}")
              .remote(args, token, limits, host) for i in range(count)]
    replicas = []
    for i, actor in enumerate(actors):
        try:
            info = ray.get(actor.info.remote(), timeout=args.replica_timeout)
        except ray.exceptions.GetTimeoutError:
            raise LambdaSplitError(f"replica {i} did not start in {args.replica_timeout:g} s (--replica-timeout); "
                                   "does the cluster have a free CPU for it (--replica-cpus)?") from None
        except ray.exceptions.RayActorError as error:
            cause = str(error.__cause__ or error).strip().splitlines()
            raise LambdaSplitError(f"replica {i} failed to start: {cause[-1] if cause else error}") from None
        replica = Replica(str(i), info["host"], info["port"], info)
        print(f"replica {i}: pid {info['pid']} at {replica.address}"
              + (f", metrics on {info['metrics']}" if info["metrics"] else ""), file=sys.stderr, flush=True)
        replicas.append((actor, replica))
    return replicas


def watch(router: Router, replicas: list[tuple[object, Replica]], interval: float, stop: threading.Event) -> None:
    """Mark replicas whose actor died (ray.kill, a crash, its node lost); a slow answer is not a death."""
    while not stop.wait(interval):
        for actor, replica in replicas:
            if not replica.alive:
                continue
            try:
                ray.get(actor.ping.remote(), timeout=max(interval, 5.0))
            except ray.exceptions.GetTimeoutError:
                pass  # busy (2 cores, a long prefill): the connect check of the next session decides
            except ray.exceptions.RayError as error:
                router.mark_dead(replica, type(error).__name__)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_on_ray(args, token: str | None, limits) -> int:
    if args.replicas < 1:
        raise LambdaSplitError("--replicas must be at least 1")
    listener = bind_listener(args.host, args.port)  # the one endpoint; refused before Ray starts if taken
    configure_logging(args.log_format)
    stop = threading.Event()
    try:
        start_ray(args.ray_address, args.ray_num_cpus)
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init (it sets its own): shut Ray down cleanly
        replicas = start_replicas(args, token, limits, args.replicas)
        router = Router([r for _, r in replicas])
        if args.metrics_port is not None:
            def targets():  # Prometheus HTTP service discovery: scrape every replica too
                groups = [{"targets": [r.info["metrics"]], "labels": {"replica": r.name}}
                          for r in router.replicas if r.alive and r.info.get("metrics")]
                return 200, json.dumps(groups).encode(), "application/json"

            http = serve_http(router.registry, args.metrics_host, args.metrics_port,
                              lambda: bool(router.live_replicas()), {"/targets": targets})
            print(f"metrics on http://{args.metrics_host}:{http.server_address[1]}/metrics", file=sys.stderr,
                  flush=True)
        threading.Thread(target=watch, args=(router, replicas, args.health_interval, stop), daemon=True,
                         name="lambdasplit-replica-health").start()

        def ready(r: Router) -> None:
            print(f"listening on {args.host}:{r.port}", flush=True)

        try:
            asyncio.run(router.serve_forever(sock=listener, on_ready=ready))
        except KeyboardInterrupt:
            pass
    finally:
        stop.set()
        listener.close()
        if ray.is_initialized():
            time.sleep(0)  # let the health thread see `stop` before Ray goes
            ray.shutdown()
    return 0
