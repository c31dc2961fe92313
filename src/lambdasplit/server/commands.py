"""`lambdasplit serve`: host a body (or the whole model, for cloud mode) on a server."""

from __future__ import annotations

import asyncio
import os
import sys

from lambdasplit.errors import LambdaSplitError
from lambdasplit.server.server import BodyServer, Limits
from lambdasplit.zoo.registry import DEFAULT_LLM


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run a body server (the cloud side)")
    p.add_argument("--model", default=DEFAULT_LLM, help="Hub id, local folder or zoo:NAME (default %(default)s)")
    p.add_argument("--layers", action="append", default=[], metavar="X:Y",
                   help="host body layers [X, Y) (repeat to host several splits)")
    p.add_argument("--cloud", action="store_true", help="host the whole model for cloud-only mode")
    p.add_argument("--component", choices=["unet", "pipeline", "unet-shard"],
                   help="host a diffusion component: unet (split), pipeline (cloud-only baseline), "
                        "unet-shard (one of the n servers of imagine --protocol ppidm)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--token", default=os.environ.get("LAMBDASPLIT_TOKEN"), help="bearer token clients must present")
    p.add_argument("--tls-cert", help="TLS certificate file (PEM)")
    p.add_argument("--tls-key", help="TLS private key file (PEM)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS and a token")
    defaults = Limits()
    p.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    p.add_argument("--max-kv-mb", type=float, default=defaults.max_kv_mb, help="KV cache per session (MiB)")
    p.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout, help="seconds before an idle session expires")
    p.add_argument("--max-frame-mb", type=float, default=defaults.max_frame_mb)
    p.add_argument("--max-positions", type=int, default=defaults.max_positions)
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
    for layers in args.layers:
        services.append(BodyService(args.model, layers, dtype=args.dtype))
    if args.cloud:
        services.append(CloudService(args.model, dtype=args.dtype))
    if not services:
        raise LambdaSplitError("nothing to serve: pass --layers X:Y, --cloud or --component unet|pipeline")
    return services


def serve_command(args) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise LambdaSplitError("--tls-cert and --tls-key go together")
    limits = Limits(max_sessions=args.max_sessions, max_kv_mb=args.max_kv_mb, idle_timeout=args.idle_timeout,
                    max_frame_mb=args.max_frame_mb, max_positions=args.max_positions)
    server = BodyServer(build_services(args), host=args.host, port=args.port, token=args.token,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, insecure=args.insecure, limits=limits)
    for service in server.services:
        print(f"hosting {service.description}", file=sys.stderr, flush=True)

    def ready(s: BodyServer) -> None:
        print(f"listening on {s.host}:{s.port}", flush=True)

    try:
        asyncio.run(server.serve_forever(on_ready=ready))
    except KeyboardInterrupt:
        pass
    return 0
