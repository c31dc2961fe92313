"""Profiles the planner's predictions are built from, all measured, cached per machine and model.

    device   per-layer compute on this machine for steps of 1, k+1 and P positions (forward
             hooks on each decoder layer of the whole model loaded here), the LM head for 1
             and k+1 rows, the generation loop's own cost per step (a real local generation
             minus its parts), weight bytes per part, KV bytes per position per layer
    server   real sessions with a real server, one per (split, codec): a prompt step, plain
             decode steps, then "probe" steps of k+1 positions. Each exchange records its
             positions, wall time, the server's compute (the RESULT frame's compute time)
             and the socket bytes both ways. The rest of the wall time is the per-exchange
             cost of the protocol and the real network to that server (encode, decode,
             framing, the socket): on a remote server this *is* the measured link.
             The tokens of each session against the reference (the whole model here, same
             dtype) give the codec's greedy agreement at that split (a quick figure over
             `new_tokens` tokens of one prompt, named as such).
    drafting per speculation source: a local run of the planner's workload with that source,
             giving tokens per round trip, positions per round trip and the source's own cost

The cache key is the model fingerprint, the machine (CPU model, cores, torch version), the
torch thread count, the dtype and the profile settings; the server profile adds the server
(a loopback server the planner started, or the address given).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lambdasplit.bench.report import _cpu_model
from lambdasplit.errors import LambdaSplitError

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue, and what a sunset has to do with it."
PROFILE_VERSION = 3  # bump when what a profile holds changes (old cache entries are then ignored)


@dataclass(frozen=True)
class Settings:
    """What a profile was measured with (part of its cache key)."""

    dtype: str = "float32"
    draft_tokens: int = 4  # k: positions drafted per round trip when speculating
    new_tokens: int = 12  # tokens per profiling session (and for the quick codec agreement)
    probes: int = 3  # extra steps of k+1 positions per session
    repeats: int = 3  # timings per layer and size on the device (the median is kept)

    @property
    def sizes(self) -> tuple[int, int]:
        return (1, self.draft_tokens + 1)


def machine_key() -> str:
    """This machine and thread count, as a short stable id."""
    text = f"{_cpu_model()}|{os.cpu_count()}|{platform.machine()}|torch {torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    from lambdasplit.zoo.registry import cache_dir

    return cache_dir() / "plan"


def cache_file(fingerprint: str, kind: str, settings: Settings, extra: str = "", prompt_ids=()) -> Path:
    key = json.dumps([PROFILE_VERSION, kind, machine_key(), asdict(settings), extra, list(prompt_ids)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / fingerprint[:16] / f"{kind}-{digest}.json"


def cached(path: Path, measure, fresh: bool = False) -> tuple[dict, bool]:
    """(profile, from_cache): read `path`, or measure and write it."""
    if not fresh and path.exists():
        try:
            return json.loads(path.read_text()), True
        except (OSError, json.JSONDecodeError):
            pass  # a broken cache entry is measured again
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)
    return value, False


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else 0.0


def _param_bytes(*modules) -> int:
    """Bytes of the modules' parameters and buffers, each tensor once (tied weights are shared)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.data_ptr() in seen or tensor.device.type == "meta":
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def device_bytes(device) -> dict:
    """What a loaded DeviceModel holds now: weights (each tensor once) and its KV caches."""
    head, tail = device.head, device.tail
    weights = _param_bytes(head.embed, head.position_embed, *head.stack.layers, *tail.stack.layers, tail.norm,
                           tail.lm_head)
    return {"weights": weights, "kv": head.stack.cache_bytes() + tail.stack.cache_bytes()}


# ---------------------------------------------------------------- device


def profile_device(device, prompt_ids: list[int], settings: Settings, progress=None) -> dict:
    """Per-layer compute here for steps of 1, k+1 and P positions, the LM head, loop cost, memory.

    `device` is the whole model loaded here (DeviceModel.load(model, None)): every layer in its head.
    """
    from lambdasplit.server.services import kv_bytes_per_position

    checkpoint = device.checkpoint
    head, tail = device.head, device.tail
    layers = head.stack.layers
    n_layers = len(layers)
    began: dict[int, float] = {}
    spent: dict[int, float] = {}

    def before(index):
        def hook(module, args, kwargs=None):
            began[index] = time.perf_counter()
        return hook

    def after(index):
        def hook(module, args, output):
            spent[index] = time.perf_counter() - began[index]
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(index)))
        handles.append(layer.register_forward_hook(after(index)))
    prompt = torch.tensor([prompt_ids])
    p = len(prompt_ids)
    sizes = sorted(set(settings.sizes) | {p})
    layer_seconds: dict[str, list[float]] = {}
    try:
        with torch.inference_mode():
            head.forward(prompt[:, :1], 0)  # warm-up
            for n in sizes:
                runs = []
                for _ in range(settings.repeats):
                    if n == p:  # the prompt step, from an empty cache
                        head.stack.truncate(0)
                        head.forward(prompt, 0)
                    else:  # n new positions after the prompt, cut back after each run
                        if head.stack.length != p:
                            head.stack.truncate(0)
                            head.forward(prompt, 0)
                        ids = (prompt_ids * (n // p + 1))[:n]
                        head.forward(torch.tensor([ids]), p)
                        head.stack.truncate(p)
                    runs.append([spent[i] for i in range(n_layers)])
                    if progress:
                        progress()
                layer_seconds[str(n)] = [_median(run[i] for run in runs) for i in range(n_layers)]
    finally:
        for handle in handles:
            handle.remove()
    lm_head_seconds = {}
    with torch.inference_mode():
        hidden = torch.randn(1, max(settings.sizes), checkpoint.config.hidden_size, dtype=device.dtype)
        for n in settings.sizes:
            runs = []
            for _ in range(settings.repeats + 1):
                t0 = time.perf_counter()
                tail.family.logits(tail.config, tail.lm_head(tail.norm(hidden[:, :n])))
                runs.append(time.perf_counter() - t0)
            lm_head_seconds[str(n)] = _median(runs[1:])
    # The loop's own cost per step (embedding, sampling, bookkeeping): a real local
    # generation minus the parts timed above.
    head.stack.truncate(0)
    result = device.generate(list(prompt_ids), max_new_tokens=settings.new_tokens, ignore_eos=True)
    parts = sum(layer_seconds[str(p)]) + lm_head_seconds["1"]
    parts += (settings.new_tokens - 1) * (sum(layer_seconds["1"]) + lm_head_seconds["1"])
    loop_seconds = max(0.0, (result.seconds - parts) / max(1, settings.new_tokens))
    if progress:
        progress()
    config = checkpoint.config
    embed_bytes = _param_bytes(head.embed) + (_param_bytes(head.position_embed) if head.position_embed else 0)
    return {
        "layers": n_layers, "hidden_size": config.hidden_size, "prompt_tokens": p,
        "layer_seconds": layer_seconds, "lm_head_seconds": lm_head_seconds, "loop_seconds": loop_seconds,
        "local_generation": {"seconds": result.seconds, "new_tokens": len(result.token_ids)},
        "reference_tokens": list(result.token_ids),
        "weight_bytes": {
            "embed": embed_bytes, "lm_head": 0 if _tied(head, tail) else _param_bytes(tail.lm_head),
            "norm": _param_bytes(tail.norm),
            "layers": [_param_bytes(layer) for layer in layers],
        },
        "kv_bytes_per_position_per_layer": kv_bytes_per_position(config, 1, device.dtype),
        "torch_threads": torch.get_num_threads(), "machine_key": machine_key(),
    }


def _tied(head, tail) -> bool:
    """Whether the LM head is the embedding table (float, or int8 device weights sharing their rows)."""
    rows = getattr(tail.lm_head, "rows", None)
    if rows is not None:
        return rows is getattr(head.embed, "rows", None)
    return tail.lm_head.weight.data_ptr() == head.embed.weight.data_ptr()


# ---------------------------------------------------------------- server


class TimedBody:
    """A RemoteBody that records every exchange: positions, wall, server compute, bytes."""

    def __init__(self, body):
        self.body = body
        self.records: list[dict] = []
        self.kind = "step"

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        body = self.body
        up, down, compute = body.bytes_up, body.bytes_down, body.cloud_seconds
        began = time.perf_counter()
        out = body.forward(hidden, start)
        wall = time.perf_counter() - began
        self.records.append({
            "kind": self.kind, "n": int(hidden.shape[1]), "wall": wall, "compute": body.cloud_seconds - compute,
            "up": body.bytes_up - up, "down": body.bytes_down - down,
        })
        return out

    @property
    def can_refine(self) -> bool:
        return getattr(self.body, "can_refine", False)

    def refine(self) -> torch.Tensor:
        """REFINE, recorded apart (kind "refine"): the cost model adds it per refined step."""
        body = self.body
        up, down = body.bytes_up, body.bytes_down
        began = time.perf_counter()
        out = body.refine()
        self.records.append({"kind": "refine", "n": 1, "wall": time.perf_counter() - began, "compute": 0.0,
                             "up": body.bytes_up - up, "down": body.bytes_down - down})
        return out

    @property
    def round_trips(self) -> int:
        return self.body.round_trips

    @property
    def cloud_seconds(self) -> float:
        return self.body.cloud_seconds


def profile_session(device, server: str, codec: str, prompt_ids: list[int], settings: Settings,
                    reference: list[int], **options) -> dict:
    """One real session at the device's split with `codec`: exchanges and the tokens' agreement."""
    from lambdasplit.client.remote import RemoteBody
    from lambdasplit.client.run import default_refine_gap

    k1 = settings.draft_tokens + 1
    with RemoteBody.for_device(device, server, codec=codec, **options) as remote:
        timed = TimedBody(remote)
        for stack in (device.head.stack, device.tail.stack):
            stack.truncate(0)
        result = device.generate(list(prompt_ids), body=timed, max_new_tokens=settings.new_tokens, ignore_eos=True,
                                 refine_gap=default_refine_gap(codec))  # the guard `generate` uses
        # probes: k+1 real positions after the session's end, cut back each time (as a rejected draft is)
        timed.kind = "probe"
        length = device.head.stack.length
        ids = torch.tensor([(list(result.token_ids) + list(prompt_ids))[:k1]])
        with torch.inference_mode():
            for _ in range(settings.probes):
                hidden = device.head.forward(ids, length)
                device.head.stack.truncate(length)
                timed.forward(hidden, length)
        remote.close()  # the CLOSE frame counts with HELLO and WELCOME: bytes outside the exchanges
        handshake = {"up": remote.bytes_up - sum(r["up"] for r in timed.records),
                     "down": remote.bytes_down - sum(r["down"] for r in timed.records)}
    tokens = list(result.token_ids)
    same = [a == b for a, b in zip(tokens, reference)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return {
        "codec": remote.codec.name, "records": timed.records, "tokens": tokens, "handshake_bytes": handshake,
        "agreement": sum(same) / len(reference) if reference else None,
        "first_divergence": first, "agreement_tokens": len(reference),
    }


def profile_server(devices, server: str, splits: list[str], codecs: list[str], prompt_ids: list[int],
                   settings: Settings, reference: list[int], progress=None, **options) -> dict:
    """Sessions at every (split, codec); {split: {codec: session}} plus the failures, by name.

    `devices(split)` returns the DeviceModel (head + tail) of a split.
    """
    sessions: dict[str, dict[str, dict]] = {split: {} for split in splits}
    failures: dict[str, str] = {}
    # codec-major: the splits take turns, so a machine that speeds up or slows down during the
    # profile (other jobs) shifts every split alike instead of the last ones only
    for codec in codecs:
        for split in splits:
            if split in failures:
                continue
            try:
                device = devices(split)
            except LambdaSplitError as error:
                failures[split] = str(error)
                continue
            try:
                sessions[split][codec] = profile_session(device, server, codec, prompt_ids, settings, reference,
                                                         **options)
            except LambdaSplitError as error:  # a server that lacks this split, a codec it refuses
                failures[f"{split} {codec}"] = str(error)
            if progress:
                progress()
    sessions = {split: by_codec for split, by_codec in sessions.items() if by_codec}
    if not sessions:
        raise LambdaSplitError("no profiling session succeeded: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return {"sessions": sessions, "failures": failures}


# ---------------------------------------------------------------- drafting


def profile_drafting(device, prompt_ids: list[int], new_tokens: int, sources: list[str], settings: Settings,
                     draft_model: str | None = None, progress=None) -> dict:
    """Per source: a local run of the workload (greedy) with the whole model `device`: tokens and
    positions per round trip, its time. Source "none" gives the workload's reference tokens."""
    from lambdasplit.speculative import make_source
    from lambdasplit.speculative.sources import DRAFT_MODEL_SOURCES

    out: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name in sources:
        try:
            source = make_source(name, device, draft_model=draft_model if name in DRAFT_MODEL_SOURCES else None)
        except LambdaSplitError as error:
            skipped[name] = str(error)
            continue
        for stack in (device.head.stack, device.tail.stack):
            stack.truncate(0)
        result = device.generate(list(prompt_ids), max_new_tokens=new_tokens, ignore_eos=True, speculate=source,
                                 draft_tokens=settings.draft_tokens)
        later = max(1, result.steps - 1)
        out[name] = {
            "tokens": len(result.token_ids), "steps": result.steps, "drafted": result.drafted,
            "accepted": result.accepted, "tokens_per_round_trip": result.accepted_per_step,
            "positions_per_round_trip": 1 + result.drafted / later, "seconds": result.seconds,
            "local_seconds": result.local_seconds, "token_ids": list(result.token_ids),
        }
        if progress:
            progress()
    return {"sources": out, "skipped": skipped}


def codec_names() -> list[str]:
    """The codecs the wire registry accepts today: the built-in floats and int8, plus any the
    registry lists (another helper adds int8+ts, int4+ts, adaptive); names it refuses are dropped."""
    from lambdasplit.wire import codecs

    names = ["fp32", "fp16", "bf16", "int8"]
    for attribute in ("CODEC_NAMES", "CODECS", "REGISTRY", "NAMED_CODECS"):
        listed = getattr(codecs, attribute, None)
        if isinstance(listed, (dict, list, tuple)):
            names += [str(name) for name in listed]
    if callable(getattr(codecs, "codec_names", None)):
        names += list(codecs.codec_names())
    names += ["int8+ts", "int4+ts", "adaptive"]
    usable = []
    for name in dict.fromkeys(names):
        try:
            codecs.get_codec(name)
        except Exception:  # noqa: BLE001 - not in this registry (yet)
            continue
        usable.append(name)
    return usable
