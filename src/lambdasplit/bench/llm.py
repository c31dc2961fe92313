"""`lambdasplit bench llm`: the Λ-Split paper's Table I, measured, for any model on any link.

Rows, in the paper's order: cloud-only; split without caching at each split; split with
caching at each split; local-only. Every row runs the same workload through
`run_generation` (the code path of `lambdasplit generate`), against a real
`lambdasplit serve` process on loopback that hosts every body and the whole model:

    prompt   exactly --prompt-tokens token ids: a fixed text (the paper's own question),
             tokenized without a chat template, repeated or cut to length
    output   exactly --new-tokens tokens, greedy. EOS rule, the same in every row: EOS
             logits are masked to -inf before sampling (= transformers' min_new_tokens),
             so generation never stops early and every row does the same work.
    codec    --codec on the wire (default fp16, as the paper sends); compute in --dtype

Measured per row: socket bytes up and down (handshake and framing included), local
compute (head + tail + sampling, timed on the device), cloud compute (body, timed by the
server and reported in every RESULT frame), communication = wall - local - cloud.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from lambdasplit.bench.report import Column, machine, megabytes
from lambdasplit.client.device import DeviceModel
from lambdasplit.client.generation import Sampling
from lambdasplit.client.run import run_generation
from lambdasplit.errors import LambdaSplitError
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.segments import parse_split

# The paper's prompt (Table I), 14 tokens with Llama 2's tokenizer.
PAPER_PROMPT = "What is the difference between AI, ML and DL?"
DEFAULT_SPLITS = "1:N-1,4:N-4,8:N-8"  # the paper's (1, 31), (4, 28), (8, 24) for N = 32


@dataclass(frozen=True)
class RowSpec:
    config: str  # cloud | split | local
    split: str = ""  # "X:Y" for split rows
    cache: str = "kv"  # kv | none

    @property
    def label(self) -> str:
        return f"split {self.split} cache={self.cache}" if self.config == "split" else f"{self.config}-only"


def resolve_splits(text: str, num_layers: int) -> list[str]:
    """'1:N-1,4:N-4' -> ['1:29', '4:26'] for N = 30 (N is the model's layer count)."""
    splits = []
    for item in [part.strip() for part in text.split(",") if part.strip()]:
        sides = []
        for side in item.split(":"):
            expression = side.replace(" ", "").upper().replace("N", str(num_layers))
            if not re.fullmatch(r"\d+([+-]\d+)*", expression):
                raise LambdaSplitError(f"bad split {item!r}: write X:Y with integers or N, e.g. 1:N-1")
            sides.append(str(eval(expression)))  # only digits and +/- reach eval (checked above)
        x, y = parse_split(":".join(sides), num_layers)
        splits.append(f"{x}:{y}")
    if not splits:
        raise LambdaSplitError("--splits is empty")
    return splits


def table_rows(splits: list[str], configs=("cloud", "split", "local"), caches=("none", "kv")) -> list[RowSpec]:
    rows = [RowSpec("cloud")] if "cloud" in configs else []
    if "split" in configs:
        for cache in [c for c in ("none", "kv") if c in caches]:  # the paper: without caching first
            rows += [RowSpec("split", split, cache) for split in splits]
    if "local" in configs:
        rows.append(RowSpec("local"))
    return rows


def exact_prompt(device: DeviceModel, tokens: int, text: str | None = None) -> list[int]:
    """Token ids of `text` (no chat template), repeated or cut to exactly `tokens` (0: as is).

    The first piece is tokenized as `generate` would (with the tokenizer's BOS, if it adds
    one); the repeats after it carry no special tokens.
    """
    text = text or PAPER_PROMPT
    ids = device.encode(text, chat=False)
    if not ids:
        raise LambdaSplitError("the prompt tokenizes to nothing")
    if tokens <= 0:
        return ids
    # Continuations: with a space, and without special tokens, so a BOS-adding tokenizer
    # (Llama 2's, for one) does not put a BOS in mid-prompt at every repeat.
    more = device.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    if not more:
        raise LambdaSplitError("the prompt tokenizes to nothing")
    while len(ids) < tokens:
        ids += more
    return ids[:tokens]


def positions_sent(prompt_tokens: int, new_tokens: int, cache: str) -> int:
    """Hidden-state positions one direction carries in a split session (the theory behind the bytes)."""
    if cache == "kv":  # the prompt once, then one position per step after the first
        return prompt_tokens + max(0, new_tokens - 1)
    # without caching, step i resends the whole sequence: prompt + i tokens
    return sum(prompt_tokens + i for i in range(new_tokens))


def server_args(model: str, splits: list[str], dtype: str, cloud: bool) -> list[str]:
    args = ["--model", model, "--dtype", dtype]
    for split in splits:
        args += ["--layers", split]
    return args + (["--cloud"] if cloud else [])


def measure_row(spec: RowSpec, *, model, devices: dict, prompt_ids: list[int], new_tokens: int,
                server: str | None, link: str | None, codec: str, dtype: str, num_layers: int) -> dict:
    """Run one row and return its Table I record."""
    common = dict(model=model, prompt=list(prompt_ids), max_new_tokens=new_tokens, cache=spec.cache,
                  sampling=Sampling(), dtype=dtype, ignore_eos=True, chat=False)
    if spec.config == "cloud":
        record = run_generation(mode="cloud", server=server, link=link, **common)
        local_layers = 0
    elif spec.config == "local":
        record = run_generation(mode="local", device=devices["local"], **common)
        local_layers = num_layers
    else:
        record = run_generation(mode="split", split=spec.split, server=server, link=link, codec=codec,
                                device=devices[spec.split], **common)
        x, y = (int(v) for v in spec.split.split(":"))
        local_layers = num_layers - (y - x)
    if record["new_tokens"] != new_tokens:
        raise LambdaSplitError(f"{spec.label} generated {record['new_tokens']} tokens, not {new_tokens}")
    remote = spec.config != "local"
    if not remote:  # local-only: the whole wall time is device time (loop bookkeeping included), as in the paper
        record["local_seconds"], record["comm_seconds"] = record["seconds"], 0.0
    return {
        "config": spec.config, "split": spec.split, "cache": spec.cache,
        "layers": f"{local_layers}:{num_layers - local_layers}",  # the paper's Local : Cloud ratio
        "codec": codec if spec.config == "split" else "",
        "link": link or "" if remote else "",
        "prompt_tokens": record["prompt_tokens"], "new_tokens": record["new_tokens"],
        "bytes_up": record["bytes_up"], "bytes_down": record["bytes_down"],
        "bytes_total": record["bytes_up"] + record["bytes_down"],
        "positions_sent": positions_sent(record["prompt_tokens"], new_tokens, spec.cache) if spec.config == "split" else 0,
        "round_trips": record["round_trips"],
        "local_s": record["local_seconds"], "cloud_s": record["cloud_seconds"], "comm_s": record["comm_seconds"],
        "total_s": record["seconds"], "tokens_per_s": record["tokens_per_second"],
    }


def caching_reduction(rows: list[dict]) -> list[dict]:
    """Per split: the traffic reduction from caching, measured and as computed from positions sent."""
    by_key = {(r["split"], r["cache"]): r for r in rows if r["config"] == "split"}
    result = []
    for (split, cache), kv in by_key.items():
        none = by_key.get((split, "none"))
        if cache != "kv" or none is None:
            continue
        result.append({
            "split": split,
            "measured_pct": 100 * (1 - kv["bytes_total"] / none["bytes_total"]),
            "from_positions_pct": 100 * (1 - kv["positions_sent"] / none["positions_sent"]),
        })
    return result


COLUMNS = [
    Column("config", "Config", numeric=False),
    Column("layers", "Local:Cloud"),
    Column("split", "Split X:Y"),
    Column("cache", "Cache", numeric=False),
    Column("bytes_up", "Up MB", megabytes),
    Column("bytes_down", "Down MB", megabytes),
    Column("bytes_total", "Total MB", megabytes),
    Column("round_trips", "Round trips", "d"),
    Column("comm_s", "Comm s", ".2f"),
    Column("local_s", "Local s", ".2f"),
    Column("cloud_s", "Cloud s", ".2f"),
    Column("total_s", "Total s", ".2f"),
    Column("tokens_per_s", "tok/s", ".2f"),
]


def run_table(*, model: str, splits: str = DEFAULT_SPLITS, prompt_tokens: int = 14, new_tokens: int = 300,
              prompt: str | None = None, link: str | None = None, codec: str = "fp16", dtype: str = "float32",
              configs=("cloud", "split", "local"), caches=("none", "kv"), server: str | None = None,
              threads: int | None = None, progress: bool = True) -> dict:
    """Measure every row; returns {"rows": [...], "reduction": [...], "meta": {...}}."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from lambdasplit.server.process import ServerProcess

    if threads:
        torch.set_num_threads(threads)
    checkpoint = Checkpoint(model)
    num_layers = checkpoint.config.num_hidden_layers
    split_list = resolve_splits(splits, num_layers) if "split" in configs else []
    specs = table_rows(split_list, configs, caches)
    if not specs:
        raise LambdaSplitError("no rows to run: check --configs and --caches")
    if link:
        from lambdasplit.wire.link import Link

        Link.parse(link)  # fail on a bad --link now, not after loading the models

    # The device side: one DeviceModel per split (head + tail only), and the whole model for local-only.
    devices = {split: DeviceModel.load(checkpoint, split, dtype) for split in split_list}
    if "local" in configs or not devices:
        devices["local"] = DeviceModel.load(checkpoint, None, dtype)
    prompt_ids = exact_prompt(next(iter(devices.values())), prompt_tokens, prompt)

    needs_server = any(s.config != "local" for s in specs)
    process = None
    if needs_server and server is None:
        env = {"OMP_NUM_THREADS": str(threads)} if threads else None
        process = ServerProcess(server_args(model, split_list, dtype, "cloud" in configs), env=env).start()
        server = process.address
    rows = []
    began = time.perf_counter()
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rows"),
                      TimeElapsedColumn(), disable=not progress, transient=False) as bar:
            task = bar.add_task("Table I", total=len(specs))
            for spec in specs:
                bar.update(task, description=f"Table I: {spec.label}")
                rows.append(measure_row(spec, model=checkpoint, devices=devices, prompt_ids=prompt_ids,
                                        new_tokens=new_tokens, server=server, link=link, codec=codec,
                                        dtype=dtype, num_layers=num_layers))
                bar.advance(task)
            bar.update(task, description="Table I: done")
    finally:
        if process is not None:
            process.stop()
    meta = {
        "model": model, "num_layers": num_layers, "hidden_size": checkpoint.config.hidden_size,
        "splits": split_list, "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens,
        "prompt_text": devices[next(iter(devices))].decode(prompt_ids), "link": link or "none (loopback)",
        "codec": codec, "dtype": dtype, "eos_rule": "EOS logits masked to -inf in every row (min_new_tokens)",
        "sampling": "greedy", "server": "external " + server if process is None and server else "lambdasplit serve subprocess on loopback",
        "seconds": time.perf_counter() - began, "machine": machine(),
    }
    return {"rows": rows, "reduction": caching_reduction(rows), "meta": meta}


def write_chart(path, rows: list[dict], title: str) -> None:
    """Throughput and traffic per configuration, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["config"] if r["config"] != "split" else f"{r['split']}\n{r['cache']}" for r in rows]
    colors = ["tab:gray" if r["config"] != "split" else ("tab:orange" if r["cache"] == "none" else "tab:blue")
              for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4.2))
    left.bar(labels, [r["tokens_per_s"] for r in rows], color=colors)
    left.set_ylabel("tokens / s")
    left.set_title("throughput")
    # No bar where nothing crossed the network (local-only): log scale has no zero.
    ups = [r["bytes_up"] / 1e6 if r["bytes_up"] else float("nan") for r in rows]
    downs = [r["bytes_down"] / 1e6 if r["bytes_down"] else float("nan") for r in rows]
    positions = range(len(rows))
    right.bar([p - 0.2 for p in positions], ups, width=0.4, label="up", color="tab:green")
    right.bar([p + 0.2 for p in positions], downs, width=0.4, label="down", color="tab:purple")
    right.set_xticks(list(positions), labels)
    right.set_yscale("log")
    right.set_ylabel("MB (log scale)")
    right.set_title("traffic")
    right.legend()
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
