"""Issue 10, defect 1, for cloud mode: a client that never reads the TOKEN frames of its streamed
generation is dropped once its unread replies pass the server's cap (`--max-unsent-mb`), and a
client beside it is served meanwhile. (tests/test_hardening.py does this for body sessions.)
"""

from __future__ import annotations

import socket
import threading

import rawproto
from rawproto import Peer
from lambdasplit.server import BodyServer, CloudService, Limits
from lambdasplit.server.server import bind_listener


def cloud_hello(fingerprint: str) -> dict:
    return {"protocol": rawproto.PROTOCOL, "role": "cloud", "model": fingerprint, "dtype": "float32"}


def generate_frame(max_new_tokens: int) -> bytes:
    return rawproto.json_frame(rawproto.GENERATE, {"prompt_ids": [5, 6, 7], "max_new_tokens": max_new_tokens,
                                                   "ignore_eos": True})


def test_a_cloud_client_that_never_reads_its_tokens_is_dropped_at_the_unsent_cap(tiny_model_dir):
    model = str(tiny_model_dir("llama", num_layers=4))  # the model of tests/gateway_stack.py
    # The write timeout is far beyond the test's bounds: only the unsent-bytes cap can drop the reader.
    limits = Limits(max_unsent_mb=4 / 1024, write_timeout=600)
    # A small kernel send buffer (accepted sockets inherit it; it also stops loopback autotuning): ~2000
    # TOKEN frames (~24 KB) would otherwise sit in the kernel's buffers and never reach the server's cap.
    listener = bind_listener("127.0.0.1", 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with BodyServer([CloudService(model)], limits=limits, sock=listener) as server:
        fingerprint = server.services[0].fingerprint
        staller = Peer(server.address, rcvbuf=4096, timeout=120)
        staller.hello(cloud_hello(fingerprint))
        staller.send(generate_frame(2000))  # ~2000 TOKEN frames, then never a read
        with Peer(server.address, timeout=60) as honest:  # served while the other one stalls
            honest.hello(cloud_hello(fingerprint))
            honest.send(generate_frame(5))
            kinds = [honest.receive()[0] for _ in range(6)]
            assert kinds == [rawproto.TOKEN] * 5 + [rawproto.DONE]
        assert rawproto.wait_for(lambda: not server.clients, 60), "the non-reader was not dropped"
        received, ended = 0, threading.Event()
        while not ended.is_set():  # its connection was cut short of the whole answer
            try:
                data = staller.sock.recv(1 << 16)
            except OSError:
                break
            received += len(data)
            if not data:
                ended.set()
        staller.close()
        assert received < 2000 * 10, f"{received} bytes: the whole stream was sent"
