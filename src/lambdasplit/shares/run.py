"""`generate --mode shared --servers A,B`: one generation over the two shares servers, and its record.

The record is `generate --json`'s (text, token ids, bytes, round trips, seconds) plus, per
server, its bytes up and down and its requests; and the device's own CPU time
(`device_cpu_seconds`, process CPU time of this process during the generation: the
servers are other processes). With a link (`--link 5g`) ONE emulated link carries both
sessions: the device has one uplink.
"""

from __future__ import annotations

import time

from lambdasplit.client.generation import Sampling
from lambdasplit.errors import LambdaSplitError
from lambdasplit.shares.device import SharedDevice


def parse_servers(text: str | list[str] | None) -> list[str]:
    servers = [s.strip() for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text or [])
    if len(servers) != 2:
        raise LambdaSplitError("--mode shared needs --servers A,B: exactly two `serve --component shares` servers "
                               "(--share 0 and --share 1), run by parties that do not collude")
    if servers[0] == servers[1]:
        raise LambdaSplitError("--mode shared: the same server is listed twice in --servers (it would get both shares)")
    return servers


def parse_merge(merge: str | bool | None) -> bool | None:
    choices = {"auto": None, None: None, "on": True, True: True, "off": False, False: False}
    if merge not in choices:
        raise LambdaSplitError(f"--shares-merge must be auto, on or off, not {merge!r}")
    return choices[merge]


def run_shared(*, model, prompt: str | list[int], servers, max_new_tokens: int, sampling: Sampling | None = None,
               lm_head: str = "shared", token=None, tls_ca=None, link=None, ignore_eos: bool = False,
               chat: bool | None = None, device: SharedDevice | None = None, on_text=None,
               captures: list[list] | None = None, timeout: float | None = None, insecure: bool = False,
               speculate: str = "none", draft_model: str | None = None, draft_tokens: int | str = "auto",
               cache: str = "kv", keep_logits: bool = False, merge: str | bool | None = "auto") -> dict:
    """Generate once in shared mode. `token` / `tls_ca`: one for both servers or a list of two.
    `merge`: "auto" / None (merged layers where the model allows), "on" / True, "off" / False."""
    if lm_head not in ("shared", "device"):
        raise LambdaSplitError(f"--shares-lm-head must be shared or device, not {lm_head!r}")
    merge = parse_merge(merge)
    addresses = parse_servers(servers)
    sampling = sampling or Sampling()
    device = device or SharedDevice.load_shared(model, lm_head=lm_head == "shared", merge=merge)
    if device.lm_head_shared != (lm_head == "shared"):
        raise LambdaSplitError("this SharedDevice was loaded with the other --shares-lm-head")
    if merge is not None and device.merge != merge:
        raise LambdaSplitError("this SharedDevice was loaded with the other --shares-merge")
    source = None
    if speculate not in (None, "none"):
        from lambdasplit.speculative import make_source

        source = make_source(speculate, device, draft_model=draft_model, sampling=sampling)
    pair = device.connect(addresses, token=token, tls_ca=tls_ca, link=link, captures=captures, timeout=timeout,
                          insecure=insecure)
    handshake_up, handshake_down = list(pair.bytes_up), list(pair.bytes_down)
    try:
        cpu0 = time.process_time()
        result = device.generate(prompt, body=device.body(), max_new_tokens=max_new_tokens, sampling=sampling,
                                 cache=cache, ignore_eos=ignore_eos, chat=chat, on_text=on_text, speculate=source,
                                 draft_tokens=draft_tokens, keep_logits=keep_logits)
        device_cpu = time.process_time() - cpu0
    finally:
        pair.close()
    costs = pair.costs
    new = len(result.token_ids)
    record = {
        "mode": "shared", "servers": addresses, "lm_head": lm_head, "merged": device.merge, "cache": cache,
        "text": result.text, "token_ids": list(result.token_ids), "prompt_tokens": len(result.prompt_ids),
        "new_tokens": new,
        "bytes_up": sum(pair.bytes_up), "bytes_down": sum(pair.bytes_down),
        "bytes_up_per_server": pair.bytes_up, "bytes_down_per_server": pair.bytes_down,
        "handshake_bytes_up_per_server": handshake_up, "handshake_bytes_down_per_server": handshake_down,
        "round_trips": costs.requests, "round_trips_per_server": [s.round_trips for s in pair.sessions],
        "round_trips_per_token": costs.requests / new if new else 0.0,
        "positions_shared": costs.rows,
        # one-position requests (every request of a plain decoding step), per request and server
        "single_row_requests": costs.single_row_requests,
        "single_row_bytes_up_per_server": costs.single_row_up, "single_row_bytes_down_per_server": costs.single_row_down,
        "seconds": result.seconds, "device_cpu_seconds": device_cpu,
        "device_share_seconds": costs.share_seconds,
        "device_arithmetic_cpu_seconds": costs.arithmetic_cpu, "device_io_cpu_seconds": costs.io_cpu,
        "cloud_seconds": costs.server_seconds, "wait_seconds": costs.wait_seconds,
        "comm_seconds": max(0.0, costs.wait_seconds - costs.server_seconds),
        "local_seconds": max(0.0, result.seconds - costs.wait_seconds),
        "tokens_per_second": new / result.seconds if result.seconds > 0 else 0.0,
        "steps": result.steps, "speculate": speculate or "none",
        "accepted_per_round_trip": result.accepted_per_step, "drafted_positions": result.drafted,
        "accepted_positions": result.accepted,
    }
    if keep_logits:
        record["_logits"] = result.logits
    return record
