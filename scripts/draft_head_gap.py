"""How well the bundled EAGLE head drafts on its training prompts, on held-out prompts of the same
templates, and on `bench wan`'s evaluation prompts, through a real loopback server.

    python scripts/draft_head_gap.py [--prompts 5] [--new-tokens 48] [--split 2:28] [--head DIR]

Starts one `lambdasplit serve` for the body, then per prompt group runs `lambdasplit generate
--speculate eagle --draft-tokens 1` (one-step acceptance: accepted / drafted positions) and
`--speculate eagle|eagle-tree --draft-tokens 5` (tokens per round trip after the prompt's step),
greedy, as a user would. The groups: the first N prompts the head was trained on, the first N of
the training run's held-out prompts (draft_train.train's split: same templates, answers never
trained on) and the first N of bench wan's prompts (chat, summarization, code; disjoint from
training; the groups are the templated set's, whichever head --head names, default the bundled
one). A head that fits its data but not the evaluation's is limited by the data, not by
the drafting machinery.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys

from lambdasplit.bench.wan import PROMPTS
from lambdasplit.server.process import ServerProcess
from lambdasplit.zoo.draft_data import training_prompts

TRAINED_PROMPTS = 1193  # the bundled head's --prompts (draft_head.json)


def prompt_groups(count: int) -> dict[str, list[str]]:
    prompts = training_prompts(TRAINED_PROMPTS, seed=0)
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)  # draft_train.train: order[:holdout] is held out
    holdout = max(1, len(prompts) // 20)
    return {"trained": [prompts[i] for i in order[holdout:holdout + count]],
            "held-out": [prompts[i] for i in order[:count]],
            "evaluation": [p for _, p in PROMPTS][:count]}


def generate(server: str, split: str, prompt: str, source: str, k: int, new_tokens: int, head=None) -> dict:
    command = [sys.executable, "-m", "lambdasplit", "generate", "--split", split, "--server", server, "--prompt",
               prompt, "--max-new-tokens", str(new_tokens), "--speculate", source, "--draft-tokens", str(k), "--json"]
    command += ["--draft-model", head] if head else []
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--split", default="2:28")
    parser.add_argument("--head", help="a trained head's folder (default: the bundled head)")
    args = parser.parse_args()
    print("| prompts | one-step acceptance (k = 1) | eagle tokens / round trip (k = 5) | eagle-tree (k = 5) |")
    print("|:---|---:|---:|---:|")
    with ServerProcess(["--layers", args.split]) as server:
        for group, prompts in prompt_groups(args.prompts).items():
            accepted = drafted = 0
            per_trip = {}
            for prompt in prompts:
                record = generate(server.address, args.split, prompt, "eagle", 1, args.new_tokens, args.head)
                accepted += record["accepted_positions"]
                drafted += record["drafted_positions"]
            for source in ("eagle", "eagle-tree"):
                tokens = trips = 0
                for prompt in prompts:
                    record = generate(server.address, args.split, prompt, source, 5, args.new_tokens, args.head)
                    later = record["steps"] - 1  # the record's figure is per step after the prompt's
                    tokens += record["accepted_per_round_trip"] * later
                    trips += later
                per_trip[source] = tokens / trips
            print(f"| {group} ({len(prompts)}) | {accepted / drafted:.1%} ({accepted}/{drafted}) | "
                  f"{per_trip['eagle']:.2f} | {per_trip['eagle-tree']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
