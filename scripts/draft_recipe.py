"""Experiment: which EAGLE training recipe gives the most accepted drafts per CPU-minute?

    python scripts/draft_recipe.py --data DIR [--minutes 4] [--variants base,vocab,unroll3,unroll3-ce1] [--out FILE]

DIR holds a `data.pt` written by `lambdasplit zoo train smollm2-draft --out DIR` (the target's greedy
answers to the training prompts). Features are computed once (DIR/features.pt, as the trainer keeps them); then each
variant trains a fresh head (same seed) for the same wall-clock minutes and is scored on the same
held-out answers by `holdout_figures`: one-step accuracy on the answers' positions, and the mean number
of drafts a greedy chain of 5 gets accepted from each answer position (bench wan's tokens per round
trip at k = 5 is 1 + that, if the server's time per position did not matter).

Variants (zoo/draft_train.py's knobs):
    base         the bundled head's recipe: teacher-forced only, CE on 25% of positions over the whole vocabulary
    vocab        + a 16,384-token draft vocabulary (CE on every position, over it)
    unroll3      + training-time test: 3 chained steps, the head fed its own predictions
    unroll3-ce1  + cross-entropy weight 1 instead of EAGLE's 0.1
Prints a markdown table (and writes it, with the JSON, to --out).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from rich.progress import Progress

from lambdasplit.client.device import DeviceModel
from lambdasplit.speculative.eagle import EagleHead, head_config
from lambdasplit.zoo import draft_train
from lambdasplit.zoo.draft_data import training_prompts

VARIANTS = {
    "base": dict(unroll=1, ce_fraction=0.25, ce_weight=0.1, draft_vocab=0),
    "vocab": dict(unroll=1, ce_fraction=1.0, ce_weight=0.1, draft_vocab=16384),
    "unroll3": dict(unroll=3, ce_fraction=1.0, ce_weight=0.1, draft_vocab=16384),
    "unroll3-ce1": dict(unroll=3, ce_fraction=1.0, ce_weight=1.0, draft_vocab=16384),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = DeviceModel.load(args.model)
    data = torch.load(args.data / "data.pt")
    sequences = data["sequences"]
    starts = draft_train.prompt_lengths(args.model, training_prompts(len(sequences), 0))
    with Progress() as progress:
        progress.add_task = draft_train._with_info(progress.add_task)
        features = draft_train.cached_features(args.data / "features.pt", data["key"], device, sequences, progress)
        order = list(range(len(sequences)))
        random.Random(0).shuffle(order)
        holdout = max(1, len(sequences) // 20)
        test_ids, train_ids = order[:holdout], order[holdout:]
        embed, tail = device.head.embed, device.tail
        for module in (embed, tail.norm, tail.lm_head):
            module.requires_grad_(False)
        rows = []
        for name in args.variants.split(","):
            knobs = VARIANTS[name]
            draft_train._seed(0)
            vocab_list = draft_train.draft_vocabulary([sequences[i] for i in train_ids],
                                                      [starts[i] for i in train_ids], knobs["draft_vocab"])
            vocab = torch.tensor(vocab_list) if vocab_list else None
            head = EagleHead(head_config(device.checkpoint.config))
            steps, losses = draft_train.fit(head, embed, tail, sequences, features, starts, train_ids, steps=2000,
                                            minutes=args.minutes, seq_len=128, batch_size=4, lr=1e-3,
                                            ce_fraction=knobs["ce_fraction"], ce_weight=knobs["ce_weight"],
                                            unroll=knobs["unroll"], vocab=vocab, progress=progress)
            figures = draft_train.holdout_figures(head, embed, tail, [sequences[i] for i in test_ids],
                                                  [features[i] for i in test_ids], [starts[i] for i in test_ids], vocab)
            rows.append({"variant": name, **knobs, "minutes": args.minutes, "steps": steps, **figures})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| variant | steps | one-step accuracy (answers) | accepted per chain of 5 | vocab coverage |",
             "|:---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['steps']} | {r['answer']:.3f} | {r['accepted_per_chain']:.3f} | "
              f"{r['vocab_coverage']:.4f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n\n" + json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
