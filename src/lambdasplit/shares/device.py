"""The device runtime of the secret-shared mode.

`SharedDevice.load(model)` builds the model's skeleton, replaces every shared layer
(layers.linear_names: the decoder's linear layers and, by default, the LM head) by a
`SharedLinear` proxy that holds no weights, and loads everything else from the checkpoint:
embedding, norms, rotary, the final norm. The family's own decoder layers then run on the
device as usual (attention over the device-held KV cache, activations, residuals), and each
proxy, when called, computes its layer through the two servers:

    x (float) -> x_int = round(x 2^FRAC_X)      O(d) on the device
    r = next masks of ChaCha20(key), s0 = x_int - r      O(d)
    server 0 <- s0, server 1 <- (header only)    both requests sent, then both answers read
                                                 (server 1 got the key once, at the session's start;
                                                 a decode step tells it all its requests in one PLAN)
    y = decode(W s0 + W r) = W x                 O(d_out) on the device; O(d d_out) on each server

Linear layers that read the same tensor (q, k, v; gate, up) go in ONE request: the first
proxy called sends the whole group and its siblings pick their answers up. So a Llama-like
layer costs 4 round trips (qkv, o, gate+up, down), each one to both servers in parallel,
plus one for the LM head per step; with the merged layers (the default where the model
allows it, shares/merged.py) 2 per layer plus 2.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.remote import Session
from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.families import family_for
from lambdasplit.llm.segments import LayerStack, Tail, load_head
from lambdasplit.shares import decode, ring
from lambdasplit.shares.layers import in_out, is_linear, linear_names, merge_plan, merge_refusal, table_digest, tied_lm_head
from lambdasplit.shares.merged import wire_merged
from lambdasplit.shares.service import PLAN_COUNT, PLAN_MARK, REQUEST_HEAD, RESULT_HEAD, ROLE, ROWS, SPATIAL
from lambdasplit.wire.frames import FRAME_HEADER, FrameType
from lambdasplit.wire.link import Link

SIBLINGS = [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]


class SharesSession(Session):
    """The device's session with one shares server."""

    def __init__(self, address: str, *, fingerprint: str, share: int, lm_head: bool, merge: bool = False, **options):
        self.address, self.share, self.seq = address, share, 0
        hello = {"role": ROLE, "model": fingerprint, "share": share, "lm_head": lm_head, "dtype": "float32",
                 "merge": merge}
        super().__init__(address, hello, **options)

    def send(self, indices: list[int], rows: int, payload: bytes | memoryview, spatial: tuple | None = None) -> int:
        head = REQUEST_HEAD.pack(self.seq, len(indices)) + struct.pack(f"<{len(indices)}H", *indices) + ROWS.pack(rows)
        if spatial is not None:
            head += SPATIAL.pack(*spatial)
        body = head + payload  # bytes + memoryview: one copy
        data = FRAME_HEADER.pack(len(body) + 1, FrameType.STEP) + body
        self.transport.send(data)
        return len(data)

    def send_plan(self, groups: list, rows: int) -> int:
        """A PLAN (share 1): the next len(groups) requests of `rows` rows each, in one frame."""
        parts = [REQUEST_HEAD.pack(self.seq, PLAN_MARK), ROWS.pack(rows), PLAN_COUNT.pack(len(groups))]
        for indices in groups:
            parts.append(struct.pack(f"<H{len(indices)}H", len(indices), *indices))
        body = b"".join(parts)
        data = FRAME_HEADER.pack(len(body) + 1, FrameType.STEP) + body
        self.transport.send(data)
        return len(data)

    def receive(self) -> tuple[memoryview, float]:
        body = self.expect(FrameType.RESULT)
        if len(body) < RESULT_HEAD.size:
            raise ProtocolError("bad_frame", f"server {self.address}: RESULT frame too short")
        seq, compute_us = RESULT_HEAD.unpack_from(body, 0)
        if seq != self.seq:
            self.close()
            raise ProtocolError("bad_result", f"server {self.address}: answer to request {seq}, expected {self.seq}")
        self.seq += 1
        self.round_trips += 1
        self.cloud_seconds += compute_us / 1e6
        return body[RESULT_HEAD.size:], compute_us / 1e6


@dataclass
class ShareCosts:
    """Per server: requests, bytes; plus the device's own share arithmetic and the waits."""

    requests: int = 0
    rows: int = 0
    server_seconds: float = 0.0  # per request the slower server's compute, summed
    wait_seconds: float = 0.0  # wall time from the first send to the last answer
    share_seconds: float = 0.0  # device wall time: encode, mask, add, decode
    arithmetic_cpu: float = 0.0  # device CPU (this thread): the O(d) share arithmetic of every request
    io_cpu: float = 0.0  # device CPU (this thread): framing, sending, receiving (sockets, the transport)
    single_row_requests: int = 0  # requests of one position (plain decoding's steady state)
    single_row_up: list = field(default_factory=lambda: [0, 0])  # their bytes, per server
    single_row_down: list = field(default_factory=lambda: [0, 0])


class SharePair:
    """The two servers, one request at a time: send to both, then read both answers."""

    def __init__(self, sessions: list, lm_head: bool):
        if len(sessions) != 2:
            raise LambdaSplitError("the secret-shared mode takes exactly two servers")
        self.sessions, self.lm_head = sessions, lm_head
        self.costs = ShareCosts()
        self.observer = None  # audit.py: observer(indices, x_int, y) sees the device's plain values
        key = ring.fresh_seed()
        self.masks = ring.MaskStream(key)  # server 1 holds the same stream: its share of every input
        tables = [self._describe(s, key if s.share == 1 else b"") for s in sessions]
        if tables[0]["digest"] != tables[1]["digest"]:
            raise LambdaSplitError("the two shares servers hold different layer tables (not the same model or "
                                   "fixed-point format)")
        self.table = tables[0]["layers"]
        self._plans: dict[tuple, tuple] = {}
        self._planned: deque = deque()  # (indices, n) server 1 was told to compute and not yet answered
        self.broken = ""  # why the two sessions' mask streams no longer match, if they do not
        # The tighter bound of the two (a server cannot widen what the other guarantees).
        self.x_bounds = [min(a["x_bound"], b["x_bound"]) for a, b in zip(tables[0]["layers"], tables[1]["layers"])]

    def _describe(self, session, payload: bytes) -> dict:
        session.send([], 0, payload)
        body, _ = session.receive()
        session.round_trips -= 1  # the handshake's describe is not a per-token round trip
        table = json.loads(bytes(body))
        if table_digest(table["layers"]) != table["digest"]:
            raise ProtocolError("bad_result", f"server {session.address}: its layer table does not match its digest")
        return table

    def run(self, indices: list[int], x: torch.Tensor | list[torch.Tensor], max_shift: int = 0) -> list[torch.Tensor]:
        """W x for each listed layer (all reading x), through the two servers; x may be a list of
        tensors [.., n, d_k] read as their concatenation (merged layers: [a ; r]). An input beyond the
        layers' bound is refused, unless `max_shift` > 0 (merged layers, which read the raw residual
        stream): then it is encoded with k <= max_shift fewer fractional bits, the fewest that bring
        it within the bound (exact in the ring: W (x 2^-k) 2^k = W x), at 2^-(FRAC_X - k) input
        resolution. The servers never learn k."""
        _, outs_per_layer, conv, _ = self._plan(indices)
        if conv is not None:  # [B, C, H, W]: n maps
            rows = x.detach().contiguous().numpy()
            spatial = tuple(rows.shape[2:])
            out_hw = conv_output_size(spatial, conv)
            lead, area = (rows.shape[0],), out_hw[0] * out_hw[1]
        elif isinstance(x, (list, tuple)):
            rows = np.concatenate([part.detach().reshape(-1, part.shape[-1]).numpy() for part in x], axis=1)
            spatial, out_hw, lead, area = None, (), tuple(x[0].shape[:-1]), 1
        else:
            rows = x.detach().reshape(-1, x.shape[-1]).numpy()
            spatial, out_hw, lead, area = None, (), tuple(x.shape[:-1]), 1
        values = torch.from_numpy(self.exchange(indices, rows, max_shift, spatial, area))
        n = rows.shape[0]
        parts = values.split([n * out * area for out in outs_per_layer]) if len(outs_per_layer) > 1 else (values,)
        return [part.view(*lead, out, *out_hw) for part, out in zip(parts, outs_per_layer)]

    def _plan(self, indices) -> tuple:
        """Per layer group, once: its input bound, output widths, convolution parameters, input width."""
        key = tuple(indices)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = (min(self.x_bounds[i] for i in indices), [self.table[i]["out"] for i in indices],
                                       self.table[indices[0]].get("conv"), self.table[indices[0]]["in"])
        return plan

    def exchange(self, indices, rows: np.ndarray, max_shift: int = 0, spatial: tuple | None = None,
                 area: int = 1) -> np.ndarray:
        """The request itself, on a float array [n, in] (or [n, C, H, W]): its answers decoded to
        float32, flat, layer after layer. Numpy throughout: per request the device's own work is a
        few O(d) array passes, so interpreter overhead is what counts (docs/benchmarks.md, device time)."""
        if self.broken:
            raise LambdaSplitError(f"shares: this pair of sessions is out of step ({self.broken}); connect again")
        began, cpu_began = time.perf_counter(), time.thread_time()
        bound, outs_per_layer, _, _ = self._plan(indices)
        n = rows.shape[0]
        peak = float(np.abs(rows).max()) if rows.size else 0.0
        shift = 0
        if not peak <= bound and max_shift and peak <= bound * 2 ** max_shift:
            shift = max(1, math.ceil(math.log2(peak / bound)))  # peak 2^-shift <= bound
            shift += peak > bound * 2 ** shift  # (log2's rounding)
        elif not peak <= bound:  # also catches NaN
            names = ", ".join(self.table[i]["name"] for i in indices)
            raise LambdaSplitError(f"shares: the input of {names} reaches {peak:.4g}, beyond the fixed-point bound "
                                   f"{bound:.4g} of that layer (2^63 / 2^{ring.FRAC_Y} / its L1 norm): refused, not run")
        planned = False
        if self._planned:  # server 1 already has this request (plan()): it must be the next one
            if self._planned[0] != (tuple(indices), n):
                raise LambdaSplitError(f"shares: request {list(indices)} x {n} out of the planned order "
                                       f"(next planned: {list(self._planned[0][0])} x {self._planned[0][1]})")
            self._planned.popleft()
            planned = True
        x_ring = ring.encode(rows, ring.FRAC_X - shift)
        masked = ring.share(x_ring, self.masks)
        sent, cpu_sent = time.perf_counter(), time.thread_time()
        first, second = self.sessions
        before = (first.bytes_up, second.bytes_up, first.bytes_down, second.bytes_down)
        first.send(indices, n, masked.data, spatial)
        if not planned:
            second.send(indices, n, b"", spatial)
        (a, ta), (b, tb) = first.receive(), second.receive()
        costs = self.costs
        if n == 1 and spatial is None:
            costs.single_row_requests += 1
            costs.single_row_up[0] += first.bytes_up - before[0]
            costs.single_row_up[1] += second.bytes_up - before[1]
            costs.single_row_down[0] += first.bytes_down - before[2]
            costs.single_row_down[1] += second.bytes_down - before[3]
        answered, cpu_answered = time.perf_counter(), time.thread_time()
        expected = 8 * n * area * sum(outs_per_layer)
        if len(a) != expected or len(b) != expected:
            raise ProtocolError("bad_result", f"a shares server answered {min(len(a), len(b))} bytes, expected {expected}")
        total = np.frombuffer(a, dtype="<u8") + np.frombuffer(b, dtype="<u8")  # modulo 2^64
        values = ring.decode_float32(total, ring.FRAC_Y - shift)
        if self.observer is not None:
            self.observer(indices, x_ring, total)
        costs.requests += 1
        costs.rows += n
        costs.server_seconds += max(ta, tb)
        costs.wait_seconds += answered - sent
        costs.share_seconds += (time.perf_counter() - began) - (answered - sent)
        costs.arithmetic_cpu += (time.thread_time() - cpu_answered) + (cpu_sent - cpu_began)
        costs.io_cpu += cpu_answered - cpu_sent
        return values

    def plan(self, requests: list[tuple[tuple[int, ...], int]]) -> None:
        """Tell server 1 the next requests (layer groups, each of the same n rows) in one PLAN frame:
        it computes them on its mask stream as they come, and exchange() sends it nothing more."""
        if self._planned:
            raise LambdaSplitError("shares: a plan is already under way")
        rows = {n for _, n in requests}
        if len(rows) != 1:
            raise LambdaSplitError("shares: a plan's requests all have the same rows")
        second = self.sessions[1]
        before = second.bytes_up
        second.send_plan([indices for indices, _ in requests], rows.pop())
        if requests[0][1] == 1:
            self.costs.single_row_up[1] += second.bytes_up - before
        self._planned.extend((tuple(indices), n) for indices, n in requests)

    def settle(self) -> None:
        """After a step that stopped early: read and drop server 1's planned answers that no request took,
        consuming the same masks, so both sides stay in step (else the pair is marked out of step)."""
        if not self._planned:
            return
        try:
            while self._planned:
                indices, n = self._planned.popleft()
                self.masks.next(n * self._plan(indices)[3])
                self.sessions[1].receive()
        except Exception as error:  # noqa: BLE001 - whatever stopped it, the streams no longer match
            self._planned.clear()
            self.broken = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.close()

    @property
    def bytes_up(self) -> list[int]:
        return [s.bytes_up for s in self.sessions]

    @property
    def bytes_down(self) -> list[int]:
        return [s.bytes_down for s in self.sessions]

    def close(self) -> None:
        for session in self.sessions:
            session.close()


def conv_output_size(spatial: tuple[int, int], conv: dict) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                 zip(spatial, conv["padding"], conv["dilation"], conv["kernel"], conv["stride"]))


class _Group:
    def __init__(self):
        self.members: list["SharedLinear"] = []
        self.input = None
        self.pending: dict[int, torch.Tensor] = {}


class SharedLinear(nn.Module):
    """A linear layer computed on shares by the two servers; holds no weights."""

    def __init__(self, index: int, name: str, in_features: int, out_features: int, owner: "SharedDevice"):
        super().__init__()
        self.index, self.name, self.in_features, self.out_features = index, name, in_features, out_features
        self.owner = [owner]  # a list: not a registered submodule
        self.group = _Group()
        self.group.members.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group.input is x and self.index in group.pending:
            return group.pending.pop(self.index)
        pair = self.owner[0].pair
        if pair is None:
            raise LambdaSplitError("shares: no servers attached (connect first)")
        members = group.members if self is group.members[0] else [self]  # a sibling on another input: alone
        outs = pair.run([m.index for m in members], x)
        group.input = x
        group.pending = {m.index: out for m, out in zip(members, outs) if m is not self}
        return outs[members.index(self)]


def group_siblings(layer: nn.Module) -> None:
    for parent in layer.modules():
        siblings = SIBLINGS
        if hasattr(parent, "to_q") and hasattr(parent, "is_cross_attention"):  # diffusers Attention
            siblings = [("to_k", "to_v")] if parent.is_cross_attention else [("to_q", "to_k", "to_v")]
        for names in siblings:
            proxies = [getattr(parent, n, None) for n in names]
            if all(isinstance(p, SharedLinear) for p in proxies):
                group = _Group()
                group.members = proxies
                for p in proxies:
                    p.group = group


class SharedDevice(DeviceModel):
    """DeviceModel whose whole decoder stack runs here, with every shared layer a SharedLinear."""

    pair: SharePair | None = None
    decode_step = True  # the decoder layers as array code (decode.DecodeStep) where the model allows it

    @classmethod
    def load_shared(cls, model: str | Checkpoint, lm_head: bool = True, merge: bool | None = None) -> "SharedDevice":
        """`merge`: the merged layers (2 requests per decoder layer, shares/merged.py); None: where the model
        allows it (layers.merge_refusal), as the servers decide."""
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
        family = family_for(checkpoint.config)
        config = checkpoint.config
        n = config.num_hidden_layers
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.folder)
        head = load_head(checkpoint, 0, "float32")
        skeleton = checkpoint.skeleton(torch.float32)
        self = cls.__new__(cls)
        refusal = merge_refusal(skeleton, family)
        if merge and refusal:
            raise LambdaSplitError(f"shares: cannot merge: {refusal}")
        merge = refusal is None if merge is None else merge
        plan = merge_plan(skeleton, family, lm_head) if merge else None
        names = linear_names(skeleton, family, lm_head)
        for index, name in enumerate(names):
            parent, _, child = name.rpartition(".")
            meta = skeleton.get_submodule(name)
            setattr(skeleton.get_submodule(parent) if parent else skeleton, child,
                    SharedLinear(index, name, *in_out(meta), self))
        layers = [skeleton.get_submodule(f"{family.layers}.{i}") for i in range(n)]
        to_load = []
        for i, layer in enumerate(layers):
            group_siblings(layer)
            owners = [name for name, m in layer.named_modules() if not isinstance(m, SharedLinear) and (
                list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))]
            top = [o for o in owners if not any(o != p and (p == "" or o.startswith(p + ".")) for p in owners)]
            to_load += [f"{family.layers}.{i}" + (f".{o}" if o else "") for o in top]
        to_load += [family.norm] + ([family.rotary] if family.rotary else [])
        checkpoint.load_modules(skeleton, to_load)
        if not lm_head:  # the LM head on the device: with tied embeddings the head's table, not a second copy
            head_module = skeleton.get_submodule(family.lm_head)
            if tied_lm_head(checkpoint, family, skeleton) and getattr(head_module, "bias", None) is None:
                head_module.to_empty(device="cpu")
                head_module.weight = head.embed.weight
            else:
                checkpoint.load_modules(skeleton, [family.lm_head], aliases={family.lm_head: family.embed} if
                                        tied_lm_head(checkpoint, family, skeleton) else None)
        for layer in layers:
            left = [name for name, p in list(layer.named_parameters()) + list(layer.named_buffers()) if p.is_meta]
            if left:
                raise LambdaSplitError(f"shares: the device could not load {left[0]} (not a linear layer)")
            if any(is_linear(m) for m in layer.modules()):
                raise LambdaSplitError("shares: a linear layer was left on the device")
        if merge:
            wire_merged(layers, plan, self, family)
            if lm_head:
                skeleton.get_submodule(family.lm_head).index = len(plan) - 1
            names = [entry if isinstance(entry, str) else entry.name for entry in plan]
        for layer in layers:
            layer.eval()
        rotary = skeleton.get_submodule(family.rotary) if family.rotary else None
        stack = LayerStack(family, config, layers, rotary, 0, n)
        empty = LayerStack(family, config, [], rotary, n, n)
        tail = Tail(empty, skeleton.get_submodule(family.norm).eval(), skeleton.get_submodule(family.lm_head),
                    family, config)
        DeviceModel.__init__(self, checkpoint, tokenizer, head, tail, (0, n), torch.float32)
        self.stack, self.lm_head_shared, self.shared_names, self.merge = stack, lm_head, names, merge
        self.pair = None
        return self

    def connect(self, servers: list[str], *, token: str | list | None = None, tls_ca: str | list | None = None,
                link=None, captures: list[list] | None = None, **options) -> SharePair:
        """Open the two sessions (each its own token / CA when given as a list of two) and attach them."""
        if len(servers) != 2 or servers[0] == servers[1]:
            raise LambdaSplitError("the secret-shared mode needs --servers A,B: two different servers "
                                   "(`serve --component shares --share 0` and `--share 1`)")
        tokens = token if isinstance(token, (list, tuple)) else [token, token]
        cas = tls_ca if isinstance(tls_ca, (list, tuple)) else [tls_ca, tls_ca]
        shared_link = Link.parse(link) if isinstance(link, str) else link  # one device, one uplink
        sessions = []
        try:
            for i, address in enumerate(servers):
                sessions.append(SharesSession(address, fingerprint=self.checkpoint.fingerprint, share=i,
                                              lm_head=self.lm_head_shared, merge=self.merge, token=tokens[i], tls_ca=cas[i],
                                              link=shared_link, capture=captures[i] if captures else None, **options))
            self.pair = SharePair(sessions, self.lm_head_shared)
            if [layer["name"] for layer in self.pair.table] != self.shared_names:  # the proxies' indices rest on it
                raise LambdaSplitError("shares: the servers' layer table is not the one this device was loaded for "
                                       "(another model revision, --shares-merge or --shares-lm-head)")
        except BaseException:
            for session in sessions:
                session.close()
            raise
        return self.pair

    def body(self) -> "SharedBody":
        return SharedBody(self.stack.fork(), self)


class SharedBody:
    """The decoder stack on the device over shares: the BodyLink the generation loop calls.

    A causal chain of positions (the prompt, each new token, a drafted block) goes through
    decode.DecodeStep where the model allows it; otherwise through the family's layers with the proxies."""

    def __init__(self, stack: LayerStack, device: SharedDevice):
        self.stack, self.device = stack, device
        self.decode_refusal = decode.refusal(device, stack) if device.decode_step else "turned off"
        self.decode = decode.DecodeStep(device, stack) if self.decode_refusal is None else None

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        if self.decode is not None and hidden.shape[0] == 1:
            return self.decode.forward(hidden, start)
        return self.stack.forward(hidden, start)

    @property
    def round_trips(self) -> int:
        return self.device.pair.costs.requests if self.device.pair else 0

    @property
    def cloud_seconds(self) -> float:
        return self.device.pair.costs.server_seconds if self.device.pair else 0.0
