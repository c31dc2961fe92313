"""`lambdasplit gateway`: the OpenAI-compatible endpoint and the web page, on the device.

Arguments are checked and the port is bound before any model loads, so a usage error or
a busy port answers in a line at once.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

from lambdasplit.client.commands import add_token_options
from lambdasplit.errors import UsageError
from lambdasplit.zoo.registry import DEFAULT_LLM


def add_commands(subparsers) -> None:
    import os

    p = subparsers.add_parser(
        "gateway", help="OpenAI-compatible API (/v1/chat/completions, ...) and web page over split inference",
        description="Serve /v1/models, /v1/chat/completions, /v1/completions and /v1/images/generations in "
                    "OpenAI's shapes, and a web page at / that shows what crossed the wire for each request. "
                    "Point any OpenAI client at http://HOST:PORT/v1.")
    p.add_argument("--model", default=DEFAULT_LLM, help="Hub id, local folder or zoo:NAME")
    p.add_argument("--mode", choices=["split", "local", "cloud"], default="split")
    p.add_argument("--server", metavar="HOST:PORT[,HOST:PORT...]",
                   help="body server(s) (`serve --layers X:Y`, or `serve --cloud` for cloud mode); several servers "
                        "hosting the same body take requests in turn")
    p.add_argument("--split", metavar="X:Y", help="head holds layers [0, X), tail [Y, N) (split mode)")
    p.add_argument("--codec", default="fp32", help="wire codec of the hidden states")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--image-model", help="diffusers pipeline folder or zoo:NAME for /v1/images/generations")
    p.add_argument("--image-server", metavar="HOST:PORT", help="its U-Net server (`serve --component unet`)")
    p.add_argument("--image-codec", default="fp32", help="codec of the predicted noise")
    p.add_argument("--host", default="127.0.0.1", help="loopback: the prompts arrive in clear HTTP")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host: anyone who reaches it reads the prompts in clear HTTP")
    add_token_options(p, "the body servers")
    p.add_argument("--tls-ca", default=os.environ.get("LAMBDASPLIT_TLS_CA"),
                   help="CA file to verify the body servers' TLS (env LAMBDASPLIT_TLS_CA)")
    p.set_defaults(func=gateway_command)


def check_args(args) -> list[str]:
    """Everything checkable without loading a model; returns the body servers."""
    servers = [s.strip() for s in (args.server or "").split(",") if s.strip()]
    for server in servers + ([args.image_server] if args.image_server else []):
        _, sep, port = server.rpartition(":")
        if not sep or not port.isdigit():
            raise UsageError(f"server address must be HOST:PORT, got {server!r}")
    if args.mode == "split" and not args.split:
        raise UsageError("gateway --mode split needs --split X:Y (the layers the body server hosts)")
    if args.mode != "local" and not servers:
        raise UsageError(f"gateway --mode {args.mode} needs --server HOST:PORT")
    if bool(args.image_model) != bool(args.image_server):
        raise UsageError("--image-model and --image-server go together")
    if not _loopback(args.host) and not args.insecure:
        raise UsageError(f"--host {args.host} is not loopback: the gateway receives prompts in clear HTTP; "
                         f"pass --insecure to allow it")
    return servers


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(128)
    return sock


def gateway_command(args) -> int:
    servers = check_args(args)
    sock = bind(args.host, args.port)
    from lambdasplit.wire.codecs import get_codec

    get_codec(args.codec, default_granularity="token")  # an unknown codec, before loading anything
    if args.mode == "split":
        from lambdasplit.client.commands import lossy_codec_warning

        warning = lossy_codec_warning(args.codec, args.dtype)
        if warning:
            print(warning, file=sys.stderr, flush=True)

    import uvicorn

    from lambdasplit.gateway.app import create_app
    from lambdasplit.gateway.engines import ImageEngine, TextEngine

    text = TextEngine(args.model, mode=args.mode, servers=servers, split=args.split, codec=args.codec,
                      dtype=args.dtype, token=args.token, tls_ca=args.tls_ca)
    image = None
    if args.image_model:
        image = ImageEngine(args.image_model, server=args.image_server, codec=args.image_codec, token=args.token,
                            tls_ca=args.tls_ca)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"listening on http://{shown}:{port}", flush=True)

    server = Server(uvicorn.Config(create_app(text, image), log_level="warning", timeout_graceful_shutdown=2))
    print(f"{args.mode} mode: {args.model}" + (f" layers {args.split} on {', '.join(servers)}" if servers else "")
          + (f"; images: {args.image_model} on {args.image_server}" if image else ""), file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
