"""`lambdasplit bench codecs`: what each wire codec costs in answer quality, and what it saves in bytes.

For each split and codec, and for each direction (up: the head's output is coded, the
body's comes back in fp32; down: the reverse; both), measured in process against fp32:

    agreement     greedy tokens equal to the fp32 split's (= the unsplit model's), position by
                  position, over --new-tokens tokens per prompt (EOS masked, so every prompt
                  runs its full length), on chat prompts (audit/data/prompts.json)
    prefix        tokens before the first difference, as a fraction of all tokens (stricter)
    flips / 1k    teacher-forced: each prompt followed by its fp32 reference, one forward with
                  the codec(s) on the way (the prompt's positions at the prefill bound, the near-
                  tie guard as REFINE applies it: a flagged position's last downlink row refined),
                  positions whose argmax differs from the same forward without codecs, per 1000
                  tokens. One early flip costs a whole prompt's agreement; this counts each once,
                  so it is the steadier figure for comparing codecs (see `teacher_forced_flips`)
    perplexity    on held-out text (audit/data/kjv_heldout.txt, disjoint from the prompts),
                  teacher-forced in one forward, and its change against fp32
    bytes/token   blob bytes per decode step (one position) in each coded direction, and
                  their fraction of fp16's blob for the same tensor

The hidden states go through the wire's own encode/decode (wire/codecs.py) on their way to
and from the body, so bytes are the blobs' real sizes; frames add 9 bytes per message and
the socket nothing else (docs/protocol.md). `--device-weights int8` adds rows where the
device's head and tail run int8 weight-only (llm/lowbit.py), with their weight memory.

`measure_codec(model, split, codec, prompts)` is the one-configuration entry point other
tools (the planner) call; `LLM_CODECS` names the codecs worth trying.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time

import torch

from lambdasplit.bench.report import Column, machine
from lambdasplit.client.remote import PRECISE_CODECS
from lambdasplit.errors import UsageError
from lambdasplit.wire.calibrated import CALIBRATED, apply_refinement, at_bound, codec_name, refinement_blob
from lambdasplit.wire.codecs import LLM_CODECS, Codec, encode, get_codec, read_header, decode_blob

DIRECTIONS = ("up", "down", "both")
DEFAULT_CODECS = "int8,int8+ts,int8+ts+z,adaptive7,adaptive,cal"
DEFAULT_SPLITS = "1:29,2:28,4:26,8:22"
__all__ = ["LLM_CODECS", "DIRECTIONS", "measure_codec", "run_codecs_bench"]

COLUMNS = [
    Column("model", "model", numeric=False),
    Column("split", "split", numeric=False),
    Column("codec", "codec", numeric=False),
    Column("direction", "coded", numeric=False),
    Column("agreement", "agreement", lambda v: f"{100 * v:.1f}%"),
    Column("prefix_agreement", "before 1st diff", lambda v: f"{100 * v:.1f}%"),
    Column("flips_per_1k", "flips / 1k", ".1f"),
    Column("perplexity", "perplexity", ".3f"),
    Column("perplexity_change", "Δ ppl", lambda v: f"{100 * v:+.2f}%"),
    Column("up_bytes_per_token", "up B/token", ".0f"),
    Column("down_bytes_per_token", "down B/token", ".0f"),
    Column("fraction_of_fp16", "of fp16", lambda v: f"{100 * v:.1f}%"),
    Column("refined", "refined", lambda v: f"{100 * v:.1f}%"),
    Column("prefill", "prompt at", numeric=False),
    Column("prompt_bytes_per_position", "prompt B/position", ".0f"),
    Column("device_weight_mb", "device weights MB", ".1f"),
]


FP16 = get_codec("fp16", default_granularity="token")


class CodedBody:
    """A body whose input (up) and/or output (down) travel as codec blobs: encoded, decoded, bytes counted.

    Bytes are counted per decode step (one position) in `bytes`, against fp16's blob for the
    same tensor in `fp16_bytes`; the prompt's step (at position 0, at the `prefill` bound when
    given, as RemoteBody.prefill) apart in `prompt_bytes`. `refine()` is the REFINE frame in
    process: the last step's last row again, in fp16.
    """

    def __init__(self, body, up: Codec | None, down: Codec | None, prefill: int | None = None):
        self.body, self.up, self.down, self.prefill = body, up, down, prefill
        self.bytes = {"up": 0, "down": 0}
        self.fp16_bytes = {"up": 0, "down": 0}
        self.steps = 0  # one-position steps counted in bytes (decode steps; the prompt's step is not)
        self.refined = 0  # of those, refined
        self.prompt_bytes, self.prompt_positions = 0, 0
        self.last_row: torch.Tensor | None = None
        self.last_down: bytes | None = None  # the last downlink blob (what a calK refinement refines)
        self.last_counted = False

    @property
    def can_refine(self) -> bool:
        return self.down is not None and self.down.name not in PRECISE_CODECS

    def refine(self) -> torch.Tensor:
        """As a server answers REFINE (server/services.py): a calK row refined, any other in fp16."""
        blob, out = refinement(self.last_row, self.last_down, self.down)
        if self.last_counted:
            self.bytes["down"] += len(blob)
            self.refined += 1
        return out.to(self.last_row.dtype)

    def _travel(self, hidden: torch.Tensor, codec: Codec | None, direction: str, start: int) -> torch.Tensor:
        if codec is None:
            return hidden
        if start == 0 and self.prefill:
            codec = at_bound(codec, self.prefill)
        blob = encode(hidden, codec).blob
        if direction == "down":
            self.last_down = blob
        if hidden.shape[1] == 1:
            self.bytes[direction] += len(blob)
            self.fp16_bytes[direction] += 4 + 4 * hidden.dim() + 2 * hidden.numel()
        elif start == 0:
            self.prompt_bytes += len(blob)
        header = read_header(blob)  # what a receiver checks before decoding
        return decode_blob(blob, header, codec.table).to(hidden.dtype)

    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        count = hidden.shape[1] == 1
        self.steps += count
        if start == 0 and not count:
            self.prompt_positions += hidden.shape[1]
        out = self.body.forward(self._travel(hidden, self.up, "up", start), start)
        self.last_row, self.last_counted = out[:, -1:], count
        return self._travel(out, self.down, "down", start)


def default_prompts(count: int = 5) -> list[str]:
    from lambdasplit.audit.inverters import shipped_text

    return json.loads(shipped_text("prompts.json"))["prompts"][:count]


def heldout_text() -> str:
    from lambdasplit.audit.inverters import shipped_text

    return shipped_text("kjv_heldout.txt")


PLANTED = "planted:"  # --model planted:FAMILY = a random model of that family with planted outlier channels
PLANTED_CHANNELS = (3, 17, 101)
PLANTED_SCALE = 300.0


def plant_outliers(model, channels=PLANTED_CHANNELS, scale: float = PLANTED_SCALE) -> None:
    """Make a few residual-stream channels massive, as trained LLMs have them: scale their embedding columns.

    The residual stream carries the embedding through every layer, so those channels stay orders
    of magnitude above the rest at every split (what per-token affine codecs lose precision on).
    """
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[:, list(channels)] *= scale


def planted_model(family: str = "qwen2", hidden_size: int = 256, num_layers: int = 8) -> str:
    """A seeded random `family` model built from a config, with planted outliers; cached; returns its folder.

    It borrows the bundled model's tokenizer (prompts tokenize as there). Weights are random:
    its agreement figures measure the codec against a model whose outputs are not language.
    """
    import time as _time

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lambdasplit.zoo.registry import DEFAULT_LLM, cache_dir, resolve

    folder = cache_dir() / f"bench-planted-{family}-d{hidden_size}-l{num_layers}"
    if (folder / "model.safetensors").exists():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_LLM))
    heads = max(1, hidden_size // 64)
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plant_outliers(model)
    staging = folder.with_name(folder.name + f".tmp{_time.time_ns()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)  # atomically: a parallel run never sees half a folder
    except OSError:  # another run got there first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return str(folder)


def resolve_model(model: str) -> str:
    """`planted:FAMILY` -> the planted-outlier model's folder; anything else as is."""
    return planted_model(model[len(PLANTED):] or "qwen2") if model.startswith(PLANTED) else model


@functools.lru_cache(maxsize=4)
def _workload(model: str, split: str, device_weights: str = "float"):
    """(device, body) for a model and split, loaded once per process."""
    from lambdasplit.client.device import DeviceModel
    from lambdasplit.llm.lowbit import apply_device_weights
    from lambdasplit.llm.segments import load_body

    device = DeviceModel.load(model, split)
    apply_device_weights(device, device_weights)
    body = load_body(device.checkpoint, *device.split)
    return device, body


_REFERENCES: dict = {}


def _reference(model: str, split: str, prompt: str, new_tokens: int) -> list[int]:
    """fp32 split tokens (equal to the unsplit model's: the split is exact in fp32)."""
    key = (model, split, prompt, new_tokens)
    if key not in _REFERENCES:
        device, body = _workload(model, split)
        _REFERENCES[key] = device.generate(prompt, body=CodedBody(body.fork(), None, None),
                                           max_new_tokens=new_tokens, ignore_eos=True).token_ids
    return _REFERENCES[key]


def _perplexity(device, body, ids: list[int]) -> float:
    head, tail = device.head.fork(), device.tail.fork()
    hidden = head.forward(torch.tensor([ids]), 0)
    hidden = body.forward(hidden, 0)
    logits = tail.forward(hidden, 0, last_only=False)[0, :-1].float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))


def _travel_all(hidden: torch.Tensor, codec: Codec | None, prompt: int, prefill: int | None) -> torch.Tensor:
    """Every row through `codec` (each vector is coded on its own), the first `prompt` at the prefill bound."""
    if codec is None:
        return hidden
    out = hidden.clone()
    for lo, hi, use in ((0, prompt, at_bound(codec, prefill) if prefill else codec), (prompt, hidden.shape[1], codec)):
        if hi > lo:
            blob = encode(hidden[:, lo:hi], use).blob
            out[:, lo:hi] = decode_blob(blob, read_header(blob), use.table).to(hidden.dtype)
    return out


def refinement(row: torch.Tensor, coarse: bytes, down: Codec) -> tuple[bytes, torch.Tensor]:
    """REFINE's answer for `row` (server/services.py) and what it decodes to: in a calK session a
    refinement of `coarse` (the blob the row travelled in, kind 7), in any other the row in fp16."""
    if down.kind == CALIBRATED:
        blob = refinement_blob(row, coarse, down.table)
        return blob, apply_refinement(coarse, blob, down.table)
    blob = encode(row, FP16).blob
    return blob, decode_blob(blob, read_header(blob), None)


@torch.inference_mode()
def _teacher_forced_logits(device, body, ids: list[int], up, down, prompt: int, prefill, refine_last=False):
    head, tail = device.head.fork(), device.tail.fork()
    hidden = head.forward(torch.tensor([ids]), 0)
    out = body.fork().forward(_travel_all(hidden, up, prompt, prefill), 0)
    back = _travel_all(out, down, prompt, prefill)
    if refine_last:
        row = out[:, -1:]
        back[:, -1:] = refinement(row, encode(row, down).blob, down)[1].to(row.dtype)
    return tail.forward(back, 0, last_only=False)[0].float()


def teacher_forced_flips(device, body, prompt_ids: list[int], reference: list[int], up, down, prefill,
                         refine_gap: float) -> int:
    """Greedy flips of a codec over one prompt + its fp32 reference, teacher-forced, guard included.

    Compared with the same forward without codecs, not with `reference`: one forward over many
    positions rounds differently from step-by-step decoding, which alone moves a few near-ties
    (scripts/codec_flips.py). A position the guard flags (coded top-2 gap below `refine_gap`, the
    downlink coded) is recomputed over its prefix with its last downlink row refined, and compared
    with the uncoded forward over the same prefix."""
    ids, n = prompt_ids + reference, len(prompt_ids)
    coded = _teacher_forced_logits(device, body, ids, up, down, n, prefill)[n - 1:len(ids) - 1]
    plain = _teacher_forced_logits(device, body, ids, None, None, n, None)[n - 1:len(ids) - 1].argmax(-1)
    top = coded.topk(2, -1)
    flips = top.indices[:, 0] != plain
    if down is not None and refine_gap > 0:
        for i in torch.nonzero(top.values[:, 0] - top.values[:, 1] < refine_gap)[:, 0].tolist():
            prefix = ids[:n + i]
            again = _teacher_forced_logits(device, body, prefix, up, down, n, prefill, refine_last=True)[-1]
            flips[i] = again.argmax() != _teacher_forced_logits(device, body, prefix, None, None, n, None)[-1].argmax()
    return int(flips.sum())


def _codecs_for(codec: str, direction: str, workload=None) -> tuple[Codec | None, Codec | None]:
    """(uplink codec, downlink codec); a `calK` codec gets each direction's table (wire/calibrate.py)."""
    if direction not in DIRECTIONS:
        raise UsageError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    parsed = get_codec(codec, default_granularity="token")
    up, down = parsed, parsed
    if parsed.kind == CALIBRATED:
        from lambdasplit.wire.calibrate import load_or_calibrate

        up_table, down_table = load_or_calibrate(*workload)
        up, down = dataclasses.replace(parsed, table=up_table), dataclasses.replace(parsed, table=down_table)
    return (up if direction in ("up", "both") else None, down if direction in ("down", "both") else None)


def measure_codec(model: str, split: str, codec: str, prompts: list[str] | None = None, *, direction: str = "both",
                  new_tokens: int = 60, heldout_tokens: int = 256, device_weights: str = "float",
                  refine_gap: float | str = "auto", prefill_codec: str | None = "auto") -> dict:
    """One table row: agreement with fp32, perplexity change, bytes per token for one configuration.
    `refine_gap`: the near-tie guard, `prefill_codec` the prompt's step's calK bound (auto: what
    `generate` uses for this codec: client/run.py, client/remote.py)."""
    from lambdasplit.client.remote import prefill_bound
    from lambdasplit.client.run import default_refine_gap
    from lambdasplit.llm.lowbit import device_weight_bytes

    prompts = default_prompts() if prompts is None else prompts
    device, body = _workload(model, split, device_weights)
    up, down = _codecs_for(codec, direction, _workload(model, split))
    agree = prefix = total = flips = 0
    coded_codec = up or down
    prefill = prefill_bound(coded_codec, prefill_codec) if coded_codec is not None and coded_codec.kind == CALIBRATED \
        else None
    coded = CodedBody(None, up, down, prefill)
    gap = (default_refine_gap(codec) if refine_gap == "auto" else float(refine_gap)) if coded.can_refine else 0.0
    for prompt in prompts:
        reference = _reference(model, split, prompt, new_tokens)
        coded.body = body.fork()
        tokens = device.generate(prompt, body=coded, max_new_tokens=new_tokens, ignore_eos=True,
                                 refine_gap=gap).token_ids
        agree += sum(a == b for a, b in zip(reference, tokens))
        prefix += next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), len(reference))
        total += len(reference)
        flips += teacher_forced_flips(device, body, device.encode(prompt), reference, up, down, prefill, gap)
    ids = device.tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][:heldout_tokens]
    reference_ppl = _reference_perplexity(model, split, tuple(ids))
    ppl = _perplexity(device, CodedBody(body.fork(), up, down), ids)  # every position at the codec's own bound
    steps = max(coded.steps, 1)
    per_token = {d: coded.bytes[d] / steps if c is not None else None for d, c in (("up", up), ("down", down))}
    fp16 = sum(coded.fp16_bytes.values())
    return {
        "model": model, "split": split, "codec": codec if up is None and down is None else (up or down).name,
        "direction": direction, "device_weights": device_weights,
        "agreement": agree / max(total, 1), "prefix_agreement": prefix / max(total, 1), "tokens": total,
        "prompts": len(prompts), "flips_per_1k": 1000 * flips / max(total, 1),
        "perplexity": ppl, "reference_perplexity": reference_ppl,
        "perplexity_change": ppl / reference_ppl - 1,
        "up_bytes_per_token": per_token["up"], "down_bytes_per_token": per_token["down"],
        "fp16_bytes_per_token": fp16 / steps / (2 if direction == "both" else 1) if fp16 else None,
        "fraction_of_fp16": sum(coded.bytes.values()) / fp16 if fp16 else None,
        "device_weight_mb": device_weight_bytes(device) / 1e6,
        "refine_gap": gap, "refined": coded.refined / steps if gap else None,
        "prefill": codec_name(prefill) if prefill else None,
        "prompt_bytes_per_position": coded.prompt_bytes / coded.prompt_positions if coded.prompt_positions else None,
    }


@functools.lru_cache(maxsize=16)
def _reference_perplexity(model: str, split: str, ids: tuple[int, ...]) -> float:
    device, body = _workload(model, split)
    return _perplexity(device, CodedBody(body.fork(), None, None), list(ids))


def run_codecs_bench(*, model: str, splits: list[str], codecs: list[str], directions: list[str],
                     prompts: list[str], new_tokens: int = 60, heldout_tokens: int = 256,
                     device_weights: list[str] = (), progress: bool = True, partial=None,
                     refine_gap: float | str = "auto", prefill_codec: str | None = "auto") -> dict:
    """Every (split, codec, direction) row, plus a device-weights row per split and mode.

    `partial`: a file path that gets each row as a JSON line as soon as it is measured (long runs).
    """
    from rich.progress import Progress

    for codec in codecs:
        get_codec(codec)  # a bad name fails before any model loads
    jobs = [(s, c, d, "float") for s in splits for c in codecs for d in directions]
    jobs += [(s, "fp32", "both", w) for s in splits for w in device_weights if w != "float"]
    rows = []
    began = time.perf_counter()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("codecs", total=len(jobs))
        for split, codec, direction, weights in jobs:
            bar.update(task, description=f"{split} {codec} {direction} weights={weights}")
            rows.append(measure_codec(model, split, codec, prompts, direction=direction, new_tokens=new_tokens,
                                      heldout_tokens=heldout_tokens, device_weights=weights,
                                      refine_gap=refine_gap, prefill_codec=prefill_codec))
            if partial is not None:
                with open(partial, "a", encoding="utf-8") as file:
                    file.write(json.dumps(rows[-1]) + "\n")
            bar.advance(task)
    meta = {"model": model, "splits": splits, "codecs": codecs, "directions": directions, "prompts": prompts,
            "new_tokens": new_tokens, "heldout_tokens": heldout_tokens, "refine_gap": refine_gap, "prefill_codec": prefill_codec, "seconds": time.perf_counter() - began,
            "machine": machine()}
    return {"rows": rows, "meta": meta}


def best_rows(rows: list[dict], *, max_fraction: float = 0.5) -> list[dict]:
    """Per split, the codec with the highest agreement in both directions within `max_fraction` of fp16."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["direction"] != "both" or row["fraction_of_fp16"] is None or row["fraction_of_fp16"] > max_fraction:
            continue
        if row["split"] not in best or row["agreement"] > best[row["split"]]["agreement"]:
            best[row["split"]] = row
    return list(best.values())


def write_chart(path, rows: list[dict], title: str) -> None:
    """Agreement against bytes (fraction of fp16), one panel per direction, one marker per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = [d for d in DIRECTIONS if any(r["direction"] == d and r["fraction_of_fp16"] for r in rows)]
    fig, axes = plt.subplots(1, max(len(directions), 1), figsize=(5 * max(len(directions), 1), 4), squeeze=False)
    codecs = sorted({r["codec"] for r in rows})
    for axis, direction in zip(axes[0], directions):
        for codec in codecs:
            points = [r for r in rows if r["direction"] == direction and r["codec"] == codec and r["fraction_of_fp16"]]
            if points:
                axis.scatter([100 * r["fraction_of_fp16"] for r in points], [100 * r["agreement"] for r in points],
                             label=codec)
        axis.axvline(50, color="grey", linestyle=":")
        axis.axhline(99, color="grey", linestyle=":")
        axis.set_xlabel("bytes per token, % of fp16")
        axis.set_ylabel("greedy agreement with fp32, %")
        axis.set_title(f"coded: {direction}")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
