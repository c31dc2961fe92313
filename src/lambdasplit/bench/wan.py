"""`lambdasplit bench wan`: speculative sources against plain split decoding on wide-area links.

For each emulated link (one-way delays, and the `wan` preset) and each draft source, the
same prompts (chat questions, summarization of a given text, code) are generated greedily
over a real `lambdasplit serve` process on loopback. Per row: tokens/s (all tokens over
all wall time), accepted tokens per round trip (after the prompt's), bytes per generated
token (every socket byte both ways, rejected positions included), device compute per
token (head + tail + drafting + verification), the speedup over `none` on the same link,
and whether every prompt's token ids equal `none`'s. The evaluation prompts below are
disjoint from the draft head's training data (zoo/draft_data.py).
"""

from __future__ import annotations

import time

import torch

from lambdasplit.bench.report import Column, machine
from lambdasplit.client.device import DeviceModel
from lambdasplit.client.run import run_generation
from lambdasplit.errors import LambdaSplitError
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.speculative.sources import DRAFT_MODEL_SOURCES

SUMMARY_TEXT = (
    "The town library opened in 1904 with four hundred books donated by local families. For decades it "
    "occupied two rooms above the post office, and the librarian, Mrs. Alder, knew every reader by name. "
    "In 1962 a new building was finished on Mill Street, with a reading room, a children's corner and space "
    "for twenty thousand books. Today the library lends e-books and tools as well as paper books, and it "
    "runs a weekly repair café where volunteers fix lamps, bicycles and clothes."
)

PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Explain in two sentences why the sky is blue."),
    ("summarization", "Summarize the following text in two sentences.\n\n" + SUMMARY_TEXT),
    ("summarization", "Summarize this text in one sentence: " + SUMMARY_TEXT),
    ("code", "Write a Python function that returns the factorial of n."),
    ("code", "Write a Python function is_palindrome(s) that checks whether a string reads the same backwards."),
]

DEFAULT_DELAYS = "5,20,40,80"

COLUMNS = [
    Column("link", "link", numeric=False),
    Column("speculate", "source", numeric=False),
    Column("tokens_per_s", "tokens/s", ".2f"),
    Column("speedup", "× none", ".2f"),
    Column("accepted_per_round_trip", "tokens / round trip", ".2f"),
    Column("round_trips", "round trips", "d"),
    Column("bytes_per_token", "bytes / token", ".0f"),
    Column("device_ms_per_token", "device ms / token", ".1f"),
    Column("drafting_share", "rounds drafting", ".2f"),
    Column("same_ids", "ids = none", numeric=False),
]


def links(delays: str, presets: str) -> list[str]:
    out = [f"delay={d.strip()}ms" for d in delays.split(",") if d.strip()]
    out += [p.strip() for p in presets.split(",") if p.strip()]
    if not out:
        raise LambdaSplitError("no links to run: give --delays and/or --presets")
    return out


def run_wan(*, model: str, split: str | None = None, sources: list[str], delays: str = DEFAULT_DELAYS,
            presets: str = "wan", new_tokens: int = 64, prompts: int = len(PROMPTS), codec: str = "fp16",
            draft_model: str | None = None, draft_tokens="auto", threads: int | None = 1,
            progress: bool = True) -> dict:
    from rich.progress import Progress

    from lambdasplit.server.process import ServerProcess
    from lambdasplit.wire.link import Link

    if threads:
        torch.set_num_threads(threads)
    checkpoint = Checkpoint(model)
    n = checkpoint.config.num_hidden_layers
    split = split or f"{min(2, n // 2)}:{max(n - 2, (n + 1) // 2)}"
    link_list = links(delays, presets)
    for link in link_list:
        Link.parse(link)
    if "none" not in sources:
        sources = ["none", *sources]
    chosen = PROMPTS[:prompts]
    device = DeviceModel.load(checkpoint, split)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    rows = []
    noise: dict[str, dict] = {}
    began = time.perf_counter()
    with ServerProcess(["--model", model, "--layers", split], env=env) as server:
        def generate(prompt: str, source: str, link: str | None) -> dict:
            return run_generation(model=checkpoint, mode="split", prompt=prompt, max_new_tokens=new_tokens,
                                  split=split, server=server.address, codec=codec, link=link, device=device,
                                  speculate=source, draft_model=draft_model if source in DRAFT_MODEL_SOURCES else None,
                                  draft_tokens=draft_tokens, trace_rounds=True)

        generate(chosen[0][1], "none", None)  # warm-up: first-call costs stay out of the table
        with Progress(disable=not progress) as bar:
            task = bar.add_task("bench wan", total=len(link_list) * (len(sources) + 1) * len(chosen))
            for link in link_list:
                # Prompt by prompt, every source in turn, then plain decoding again: on a shared, loaded
                # machine the load drifts over minutes, and interleaving spreads that drift over all
                # sources alike; how far the two plain runs differ is the noise every "x none" carries.
                records: dict[str, list[dict]] = {source: [] for source in [*sources, "none again"]}
                for _, prompt in chosen:
                    for source in [*sources, "none again"]:
                        bar.update(task, description=f"bench wan: {link} {source}")
                        records[source].append(generate(prompt, source.split()[0], link))
                        bar.advance(task)
                reference = records["none"]
                for source in sources:
                    row = summarize(link, source, records[source])
                    row["same_ids"] = all(a["token_ids"] == b["token_ids"] for a, b in zip(records[source], reference))
                    rows.append(row)
                again = summarize(link, "none", records["none again"])
                base = next(r for r in rows if r["link"] == link and r["speculate"] == "none")
                noise[link] = {"first": base["tokens_per_s"], "again": again["tokens_per_s"],
                               "ratio": again["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0}
                for r in rows:
                    if r["link"] == link:
                        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
        tree = tree_oracle(device, server.address, [p for _, p in chosen], new_tokens, codec,
                           draft_model) if "eagle-tree" in sources else None
    meta = {
        "model": model, "split": split, "num_layers": n, "hidden_size": checkpoint.config.hidden_size,
        "codec": codec, "new_tokens": new_tokens, "prompts": [{"kind": k, "prompt": p} for k, p in chosen],
        "links": link_list, "sources": sources, "draft_tokens": draft_tokens, "draft_model": draft_model,
        "sampling": "greedy", "eos_rule": "stops at EOS (the token is kept)",
        "server": "lambdasplit serve subprocess on loopback", "seconds": time.perf_counter() - began,
        "machine": machine(), "plain_again": noise,
    }
    return {"rows": rows, "meta": meta, "tree": tree}


def tree_oracle(device, address: str, prompts: list[str], new_tokens: int, codec: str,
                draft_model: str | None, depth: int = 6) -> dict:
    """What verifying EAGLE's whole tree in one step (protocol v2's `parents`) would add over the best path
    sent as a chain: for every round of an `eagle-tree` run with a fixed depth, the tokens the target accepts
    from the path sent (then +1 for its own token) vs from the best path in the whole tree (greedy: the
    deepest path matching the target's own continuation), and what the greedy chain alone would get."""
    from lambdasplit.client import RemoteBody
    from lambdasplit.speculative import make_source

    sums = {"rounds": 0, "chain": 0, "path": 0, "tree": 0, "nodes": 0}
    for prompt in prompts:
        source = make_source("eagle-tree", device, draft_model=draft_model)  # fresh head cache per prompt
        source.trees = []
        source.verify_trees = False  # the oracle compares the path sent as a chain with the whole tree
        prompt_ids = device.encode(prompt)
        with RemoteBody.for_device(device, address, codec=codec) as body:
            result = device.generate(prompt_ids, body=body, max_new_tokens=new_tokens, speculate=source,
                                     draft_tokens=depth)
        for length, tree, path in source.trees:
            truth = result.token_ids[length - len(prompt_ids):]
            chain = _greedy_chain(tree)
            sums["rounds"] += 1
            sums["nodes"] += len(tree.tokens)
            sums["path"] += _matched([tree.tokens[i] for i in path], truth)
            sums["chain"] += _matched(chain, truth)
            sums["tree"] += tree.accepted_by(truth)
    rounds = max(1, sums["rounds"])
    return {"depth": depth, "rounds": sums["rounds"], "nodes_per_tree": sums["nodes"] / rounds,
            **{f"tokens_per_round_trip_{k}": 1 + sums[k] / rounds for k in ("chain", "path", "tree")}}


def _greedy_chain(tree) -> list[int]:
    node, tokens = -1, []
    while True:
        children = [i for i, p in enumerate(tree.parents) if p == node]
        if not children:
            return tokens
        node = max(children, key=lambda i: tree.scores[i])
        tokens.append(tree.tokens[node])


def _matched(draft: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(draft) and n < len(truth) and draft[n] == truth[n]:
        n += 1
    return n


def summarize(link: str, source: str, records: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    later_trips = sum(max(0, r["round_trips"] - 1) for r in records)
    later_tokens = sum(r["accepted_per_round_trip"] * max(0, r["round_trips"] - 1) for r in records)
    return {
        "link": link, "speculate": source, "prompts": len(records), "new_tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "accepted_per_round_trip": later_tokens / later_trips if later_trips else 0.0,
        "round_trips": sum(r["round_trips"] for r in records),
        "bytes_up": sum(r["bytes_up"] for r in records), "bytes_down": sum(r["bytes_down"] for r in records),
        "bytes_per_token": sum(r["bytes_up"] + r["bytes_down"] for r in records) / tokens if tokens else 0.0,
        "device_ms_per_token": 1e3 * sum(r["local_seconds"] for r in records) / tokens if tokens else 0.0,
        "rejected_positions": sum(r["rejected_positions"] for r in records),
        "drafted_positions": sum(r["drafted_positions"] for r in records),
        "drafting_share": _drafting_share(records),
    }


def _drafting_share(records: list[dict]) -> float:
    """Of the decode rounds (the prompt's excluded), the share that sent drafts (speculative runs only)."""
    rounds = [x for r in records for x in (r.get("rounds") or [])[1:]]
    return sum(x["drafted"] > 0 for x in rounds) / len(rounds) if rounds else 0.0


def write_chart(path, rows: list[dict], title: str) -> None:
    """tokens/s against one-way delay, one line per source (preset links are left out of the chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.2))
    for source in dict.fromkeys(r["speculate"] for r in rows):
        points = sorted((float(r["link"][len("delay="):-2]), r["tokens_per_s"]) for r in rows
                        if r["speculate"] == source and r["link"].startswith("delay="))
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=source)
    axis.set_xlabel("one-way delay (ms)")
    axis.set_ylabel("tokens / s")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
