"""`lambdasplit bench overhead`: what the framework itself costs, per model.

For each model, the same greedy generation (14-token prompt, --new-tokens tokens, EOS
masked, KV caches on) runs three ways, interleaved, --repeats times (median kept):

    local       the whole model in this process
    in-process  the same split, the body called directly in this process: no network
    loopback    the same split, the body in a real `lambdasplit serve` process on loopback

loopback / in-process is the cost of the protocol, codec, sockets and the second
process; in-process / local is the cost of cutting the model into segments.

Bytes per generated token (steady state, both directions) are measured as the
difference of two loopback runs of different lengths, so the handshake and the prompt
step cancel out, and compared with the theory: 2 x D x bytes per element (one hidden
vector up, one down).

Models, both by default: the one given (default the bundled SmolLM2, D = 576) and a
wider Llama built from a config with random weights (default D = 2048, 6 layers), which
is enough for speed and bytes. The result's meta names the machine (CPU model, cores,
torch version and threads, load average), so every figure can say where it was taken.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from lambdasplit.bench.llm import exact_prompt, resolve_splits
from lambdasplit.bench.report import Column, machine
from lambdasplit.client.device import DeviceModel, InProcessBody
from lambdasplit.client.run import run_generation
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.segments import load_body
from lambdasplit.wire.codecs import get_codec
from lambdasplit.zoo.registry import DEFAULT_LLM, cache_dir, resolve

MODES = ("local", "in-process", "loopback")


def build_wide_model(hidden_size: int = 2048, num_layers: int = 6, tokenizer_from: str = DEFAULT_LLM) -> Path:
    """A random-weight Llama of width `hidden_size`, cached in the lambdasplit cache; returns its folder.

    It borrows the bundled model's tokenizer (so prompts tokenize as they do there).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = cache_dir() / f"bench-llama-d{hidden_size}-l{num_layers}"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(resolve(tokenizer_from))
    head_dim = 128 if hidden_size % 128 == 0 else 64
    heads = hidden_size // head_dim
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=int(hidden_size * 2.75),
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    staging = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)  # atomically: a parallel run never sees half a folder
    return folder


def _tokens_per_second(run) -> float:
    began = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - began)


def measure_model(label: str, model: str, split: str, *, new_tokens: int, repeats: int, codec: str,
                  threads: int | None = None, on_step=None) -> dict:
    """One row of the overhead table (see the module doc)."""
    from lambdasplit.server.process import ServerProcess

    checkpoint = Checkpoint(model)
    config = checkpoint.config
    split = resolve_splits(split, config.num_hidden_layers)[0]
    x, y = (int(v) for v in split.split(":"))
    local = DeviceModel.load(checkpoint, None)
    device = DeviceModel.load(checkpoint, split)
    body = load_body(checkpoint, x, y)
    prompt_ids = exact_prompt(device, 14)
    options = dict(max_new_tokens=new_tokens, ignore_eos=True)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    with ServerProcess(["--model", model, "--layers", split], env=env) as server:
        def remote(tokens: int = new_tokens) -> dict:
            return run_generation(model=checkpoint, mode="split", split=split, server=server.address, codec=codec,
                                  device=device, prompt=list(prompt_ids), max_new_tokens=tokens, ignore_eos=True)

        runs = {
            "local": lambda: len(local.generate(list(prompt_ids), **options).token_ids),
            "in-process": lambda: len(device.generate(list(prompt_ids), body=InProcessBody(body.fork()),
                                                      **options).token_ids),
            "loopback": lambda: remote()["new_tokens"],
        }
        # Warm-up, untimed: first-call allocations on both sides, the server's first session.
        local.generate(list(prompt_ids), max_new_tokens=4, ignore_eos=True)
        device.generate(list(prompt_ids), body=InProcessBody(body.fork()), max_new_tokens=4, ignore_eos=True)
        remote(4)
        speeds = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:  # interleaved, so a burst of load from other jobs hits every mode alike
                speeds[mode].append(_tokens_per_second(runs[mode]))
                if on_step:
                    on_step()
        half, full = remote(new_tokens // 2), remote(new_tokens)
    per_token = (full["bytes_up"] + full["bytes_down"] - half["bytes_up"] - half["bytes_down"]) / (
        new_tokens - new_tokens // 2)
    element_bytes = get_codec(codec).bits / 8
    theory = 2 * config.hidden_size * element_bytes
    tps = {mode: statistics.median(values) for mode, values in speeds.items()}
    return {
        "model": label, "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers, "split": split,
        "codec": codec, "new_tokens": new_tokens, "repeats": repeats,
        "local_tps": tps["local"], "inprocess_tps": tps["in-process"], "loopback_tps": tps["loopback"],
        "loopback_vs_inprocess": tps["loopback"] / tps["in-process"],
        "loopback_vs_local": tps["loopback"] / tps["local"],
        "overhead_ms_per_token": 1000 * (1 / tps["loopback"] - 1 / tps["in-process"]),
        "bytes_per_token": per_token, "theory_bytes_per_token": theory, "bytes_vs_theory": per_token / theory,
        "all_tps": {mode: values for mode, values in speeds.items()},
    }


COLUMNS = [
    Column("model", "Model", numeric=False),
    Column("hidden_size", "D", "d"),
    Column("split", "Split"),
    Column("local_tps", "local tok/s", ".1f"),
    Column("inprocess_tps", "in-process split tok/s", ".1f"),
    Column("loopback_tps", "loopback split tok/s", ".1f"),
    Column("loopback_vs_inprocess", "loopback / in-process", ".3f"),
    Column("loopback_vs_local", "loopback / local", ".3f"),
    Column("overhead_ms_per_token", "overhead ms/token", ".2f"),
    Column("bytes_per_token", "bytes/token", ".0f"),
    Column("theory_bytes_per_token", "2·D·bytes", ".0f"),
    Column("bytes_vs_theory", "ratio", ".4f"),
]


def run_overhead(*, model: str = DEFAULT_LLM, split: str = "1:N-1", wide_hidden: int = 2048, wide_layers: int = 6,
                 wide_split: str = "1:N-1", new_tokens: int = 64, repeats: int = 3, codec: str = "fp16",
                 threads: int | None = None, progress: bool = True) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if threads:
        torch.set_num_threads(threads)
    load_at_start = machine()["load_average"]
    models = [(model, model, split)]
    if wide_hidden:
        wide = build_wide_model(wide_hidden, wide_layers)
        models.append((f"random Llama D={wide_hidden}, {wide_layers} layers", str(wide), wide_split))
    began = time.perf_counter()
    rows = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("overhead", total=len(models) * repeats * len(MODES))
        for label, folder, model_split in models:
            bar.update(task, description=f"overhead: {label}")
            rows.append(measure_model(label, folder, model_split, new_tokens=new_tokens, repeats=repeats, codec=codec,
                                      threads=threads, on_step=lambda: bar.advance(task)))
    meta = {"new_tokens": new_tokens, "repeats": repeats, "codec": codec, "prompt_tokens": 14,
            "threads_per_process": threads or torch.get_num_threads(),
            "statistic": "median tokens/s over interleaved repeats", "seconds": time.perf_counter() - began,
            "load_average_at_start": load_at_start, "machine": machine()}
    return {"rows": rows, "meta": meta}
