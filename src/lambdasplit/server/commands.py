"""`lambdasplit serve`: host a body (or the whole model, for cloud mode) on a server."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from lambdasplit.errors import LambdaSplitError
from lambdasplit.zoo.registry import DEFAULT_LLM


class LimitDefault:
    """An option's default that is `Limits()`'s field of that name, looked up only when shown or used:
    server/server.py imports torch (through wire/frames.py), and a usage error must not wait for it."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        from lambdasplit.server.server import Limits  # noqa: PLC0415

        return str(getattr(Limits(), self.name))


def limits_from_args(args):
    """The `Limits` of the options given; the others keep their defaults."""
    import dataclasses

    from lambdasplit.server.server import Limits  # noqa: PLC0415

    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(Limits)
             if not isinstance(getattr(args, field.name, None), (LimitDefault, type(None)))}
    return Limits(**given)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run a body server (the cloud side)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              description="Host model layers for split clients. Limits and defences: docs/security.md.")
    p.add_argument("--model", default=DEFAULT_LLM, help="Hub id, local folder or zoo:NAME (default %(default)s)")
    p.add_argument("--layers", action="append", default=[], metavar="X:Y",
                   help="host body layers [X, Y) (repeat to host several splits)")
    p.add_argument("--cloud", action="store_true", help="host the whole model for cloud-only mode")
    p.add_argument("--component", choices=["unet", "pipeline", "unet-shard", "shares"],
                   help="host a diffusion component: unet (split), pipeline (cloud-only baseline), "
                        "unet-shard (one of the n servers of imagine --protocol ppidm); or shares: one of the "
                        "two servers of the secret-shared mode (generate --mode shared, needs --share 0|1)")
    p.add_argument("--share", type=int, choices=[0, 1],
                   help="--component shares: which share this server computes on (0: x - r, 1: r from a seed)")
    p.add_argument("--shares-lm-head", choices=["shared", "device"], default="shared",
                   help="--component shares: hold the LM head too (shared) or leave it to the device")
    p.add_argument("--shares-merge", choices=["auto", "on", "off"], default="auto",
                   help="--component shares: the merged layers, 2 requests per decoder layer (auto: where the model "
                        "allows it; the device must use the same)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--token-file", help="file whose first line is the bearer token clients must present "
                   "(or set LAMBDASPLIT_TOKEN)")
    p.add_argument("--token", help="the bearer token itself; visible to every local user in the process list, "
                   "prefer --token-file")
    p.add_argument("--tls-cert", help="TLS certificate file (PEM)")
    p.add_argument("--tls-key", help="TLS private key file (PEM)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS and a token")
    defaults = argparse.Namespace(**{name: LimitDefault(name) for name in (
        "max_sessions", "max_kv_mb", "max_pending_per_client", "max_total_sessions", "max_total_kv_mb", "max_pending",
        "idle_timeout", "hello_timeout", "write_timeout", "max_unsent_mb", "max_frame_mb", "max_positions",
        "queue_timeout", "max_queue", "max_batch", "prefill_chunk")})
    p.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                   help="concurrent sessions per client (an IPv4 address, an IPv6 /64, or all of loopback)")
    p.add_argument("--max-kv-mb", type=float, default=defaults.max_kv_mb,
                   help="KV cache per client, all its sessions together (MiB)")
    p.add_argument("--max-pending-per-client", type=int, default=defaults.max_pending_per_client,
                   help="connections per client that have not finished HELLO")
    p.add_argument("--max-total-sessions", type=int, default=defaults.max_total_sessions,
                   help="concurrent sessions, all clients together")
    p.add_argument("--kv-budget-mb", "--max-total-kv-mb", dest="max_total_kv_mb", type=float,
                   default=defaults.max_total_kv_mb,
                   help="server-wide KV cache budget, all sessions together (MiB), granted step by step; new "
                        "sessions wait for it in a queue")
    p.add_argument("--queue-timeout", type=float, default=defaults.queue_timeout,
                   help="seconds a new session waits for KV budget before the error server_busy")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="new sessions waiting for KV budget at once")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="sessions' steps batched into one forward (per hosted body)")
    p.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk,
                   help="positions of a long step (prompt) run per forward, beside the decode steps")
    p.add_argument("--max-pending", type=int, default=defaults.max_pending,
                   help="connections that have not finished HELLO, all clients together")
    p.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout,
                   help="seconds without a frame before a session expires")
    p.add_argument("--hello-timeout", type=float, default=defaults.hello_timeout,
                   help="seconds a new connection has to send its HELLO")
    p.add_argument("--write-timeout", type=float, default=defaults.write_timeout,
                   help="seconds a reply may wait for the client to read it before the session is dropped")
    p.add_argument("--max-unsent-mb", type=float, default=defaults.max_unsent_mb,
                   help="unread replies (MiB) beyond the one being sent before the session is dropped")
    p.add_argument("--max-frame-mb", type=float, default=defaults.max_frame_mb, help="largest frame accepted (MiB)")
    p.add_argument("--max-positions", type=int, default=defaults.max_positions, help="positions per session")
    # Operations (server/ops.py) and scale-out on Ray (server/ray_cluster.py); docs/deploy.md.
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, help="serve /metrics (Prometheus), /healthz and /readyz on this "
                     "port (0: a free one, printed); off by default")
    ops.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port (plain HTTP)")
    ops.add_argument("--log-format", choices=["text", "json"], default="text",
                     help="logs on stderr, one line per session start and end: text or one JSON object per line")
    ray_opts = p.add_argument_group("scale-out on Ray")
    ray_opts.add_argument("--ray", action="store_true", help="run the body in Ray actors (replicas) behind one "
                          "router on --host/--port; sessions go to the least-loaded live replica")
    ray_opts.add_argument("--replicas", type=int, default=2, help="body replicas (Ray actors)")
    ray_opts.add_argument("--ray-address", help="join this Ray cluster (`auto` after `ray start`); default: start "
                          "a local one")
    ray_opts.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    ray_opts.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs each replica takes")
    ray_opts.add_argument("--replica-timeout", type=float, default=300.0,
                          help="seconds a replica may take to load its model and listen")
    ray_opts.add_argument("--health-interval", type=float, default=1.0,
                          help="seconds between checks that each replica's actor is alive")
    p.set_defaults(func=serve_command)


def build_services(args) -> list:
    from lambdasplit.server.services import BodyService, CloudService

    services = []
    if args.component == "unet":
        from lambdasplit.diffusion.server import UNetService  # noqa: PLC0415 (diffusion is optional here)

        services.append(UNetService(args.model, dtype=args.dtype))
    if args.component == "pipeline":
        from lambdasplit.diffusion.server import PipelineService  # noqa: PLC0415

        services.append(PipelineService(args.model, dtype=args.dtype))
    if args.component == "unet-shard":
        from lambdasplit.diffusion.ppidm.service import UNetShardService  # noqa: PLC0415

        services.append(UNetShardService(args.model, dtype=args.dtype))
    if args.component == "shares":
        from lambdasplit.shares.service import SharesService  # noqa: PLC0415

        if args.share is None:
            raise LambdaSplitError("--component shares needs --share 0 or --share 1")
        services.append(SharesService(args.model, args.share, lm_head=args.shares_lm_head == "shared",
                                      dtype=args.dtype, merge={"auto": None, "on": True, "off": False}[args.shares_merge]))
    for layers in args.layers:
        services.append(BodyService(args.model, layers, dtype=args.dtype))
    if args.cloud:
        services.append(CloudService(args.model, dtype=args.dtype))
    if not services:
        raise LambdaSplitError("nothing to serve: pass --layers X:Y, --cloud or --component unet|pipeline")
    return services


def read_token(args) -> str | None:
    """--token-file, else --token (with a warning), else LAMBDASPLIT_TOKEN."""
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.readline().strip()
        except OSError as error:
            raise LambdaSplitError(f"cannot read --token-file {args.token_file}: {error.strerror}") from None
        if not token:
            raise LambdaSplitError(f"--token-file {args.token_file} is empty")
        return token
    if args.token:
        print("lambdasplit: warning: --token is visible to every local user in the process list; "
              "use --token-file or LAMBDASPLIT_TOKEN", file=sys.stderr, flush=True)
        return args.token
    return os.environ.get("LAMBDASPLIT_TOKEN") or None


def serve_command(args) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise LambdaSplitError("--tls-cert and --tls-key go together")
    token = read_token(args)
    from lambdasplit.server.ops import ServerOps, configure_logging  # noqa: PLC0415
    from lambdasplit.server.server import BodyServer, bind_listener, check_exposure  # noqa: PLC0415 (torch)

    limits = limits_from_args(args)
    if limits.max_batch < 1 or limits.prefill_chunk < 1:
        raise LambdaSplitError("--max-batch and --prefill-chunk must be at least 1")
    # Everything that can be refused without the model is checked first (loading takes a while).
    check_exposure(args.host, token, args.tls_cert, args.insecure)
    if args.ray:
        try:
            from lambdasplit.server.ray_cluster import serve_on_ray  # noqa: PLC0415 (Ray is an optional extra)
        except ImportError as error:
            raise LambdaSplitError(f"serve --ray needs Ray ({error}): pip install 'lambdasplit[ray]'") from None

        return serve_on_ray(args, token, limits)
    listener = bind_listener(args.host, args.port)
    configure_logging(args.log_format)
    ops = ServerOps()
    if args.metrics_port is not None:  # answers /healthz (and /readyz: not yet) while the model loads
        try:
            port = ops.serve_http(args.metrics_host, args.metrics_port)
        except BaseException:
            listener.close()
            raise
        print(f"metrics on http://{args.metrics_host}:{port}/metrics", file=sys.stderr, flush=True)
    try:
        server = BodyServer(build_services(args), host=args.host, port=args.port, token=token,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure, limits=limits,
                            sock=listener)
    except BaseException:
        listener.close()
        raise
    ops.attach(server)
    for service in server.services:
        print(f"hosting {service.description}", file=sys.stderr, flush=True)

    def ready(s: BodyServer) -> None:
        ops.set_ready()
        print(f"listening on {s.host}:{s.port}", flush=True)

    try:
        asyncio.run(server.serve_forever(on_ready=ready))
    except KeyboardInterrupt:
        pass
    return 0


