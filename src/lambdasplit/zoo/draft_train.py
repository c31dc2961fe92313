"""`lambdasplit zoo train smollm2-draft`: train the EAGLE-style draft head for the default model.

Three phases, each with a progress bar, all seeded (torch, Python's random):
  1. data: the target's own greedy answers to `--prompts` training prompts (zoo/draft_data.py),
     generated with transformers' batched `generate`; kept in OUT/data.pt so a rerun skips it;
  2. features: one forward of the target over each prompt + answer (lambdasplit's own
     segments, as on the device) gives every position's last-layer features (OUT/features.pt);
  3. training: fc + one decoder layer, on the answer's positions only; AdamW, warm-up then
     cosine decay over `--steps` or `--minutes`, whichever ends first. Step 0 is teacher-forced
     on the true features with a little uniform noise (EAGLE's recipe); with `--unroll U`, U - 1
     more steps feed the head its own predictions, each position seeing the true features of its
     past and its own chain's predictions (EAGLE-3's "training-time test"), so training sees what
     drafting k tokens sees. Loss per step = smooth-L1 on the next features + `--ce-weight` x
     the cross-entropy against the target's next-token distribution (through the target's frozen
     norm and LM head). With `--draft-vocab N` the head drafts from the N tokens most frequent in
     the answers (EAGLE-3's reduced draft vocabulary: the LM head over 49,152 tokens was most of a
     drafted token's device time and of a training step), and the cross-entropy is over them; the
     target still verifies every token over its whole vocabulary, so output is unchanged.
The head works on the features before the final norm (what the tail holds), whose scale is
~15x that of the normed features EAGLE regresses (HF's hidden_states[-1]) and varies by
position, so the regression and the noise are taken relative to each position's RMS: this
keeps EAGLE's balance of the two losses and its noise level.
The head is written to OUT in fp16 (draft_head.safetensors + draft_head.json with the target's
fingerprint, the draft vocabulary, the command, the figures); `--speculate eagle` finds it there (the default
OUT is the user cache; `--out src/lambdasplit/zoo/data/smollm2_draft` makes it the bundled one).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

DEFAULTS = dict(prompts=1200, new_tokens=128, steps=4000, minutes=45.0, seq_len=128, batch_size=4, lr=1e-3,
                ce_fraction=1.0, ce_weight=0.1, unroll=1, draft_vocab=16384)


def add_train_arguments(p) -> None:
    p.add_argument("--model", default="zoo:smollm2", help="the target model (default %(default)s)")
    p.add_argument("--out", type=Path, help="output folder (default: <cache>/smollm2-draft)")
    p.add_argument("--prompts", type=int, default=DEFAULTS["prompts"], help="training prompts answered (default %(default)s; 1193 exist)")
    p.add_argument("--new-tokens", type=int, default=DEFAULTS["new_tokens"], help="answer length cap (default %(default)s)")
    p.add_argument("--generate-batch", type=int, default=8, help="prompts per batched generate (default %(default)s)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="training steps at most (default %(default)s)")
    p.add_argument("--minutes", type=float, default=DEFAULTS["minutes"], help="training time budget (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="positions per training sequence")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--ce-fraction", type=float, default=DEFAULTS["ce_fraction"],
                   help="share of positions whose cross-entropy is computed each step (the LM head over the whole "
                        "vocabulary is most of the cost; default %(default)s)")
    p.add_argument("--ce-weight", type=float, default=DEFAULTS["ce_weight"],
                   help="weight of the cross-entropy against the feature regression (default %(default)s, EAGLE's)")
    p.add_argument("--unroll", type=int, default=DEFAULTS["unroll"],
                   help="chained steps per position, the head fed its own predictions after the first "
                        "(training-time test; 1: teacher-forced only; default %(default)s)")
    p.add_argument("--draft-vocab", type=int, default=DEFAULTS["draft_vocab"],
                   help="tokens the head drafts from, the answers' most frequent (0: the whole vocabulary; "
                        "default %(default)s)")
    p.add_argument("--prompt-set", choices=["templates", "diverse"], default="templates",
                   help="training prompts: templates (1193, the bundled head's) or diverse (2690: vocabulary words, "
                        "countries, the standard library, composed code tasks, passages; zoo/draft_data.py)")
    p.add_argument("--init", type=Path, help="start from this trained head's folder (its draft vocabulary joins the new one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s: an idle 2-core machine)")
    p.set_defaults(func=train_command)


def train_command(args) -> int:
    from lambdasplit.zoo.registry import cache_dir

    out = args.out or cache_dir() / "smollm2-draft"
    result = train(model=args.model, out=out, prompts=args.prompts, new_tokens=args.new_tokens,
                   generate_batch=args.generate_batch, steps=args.steps, minutes=args.minutes, seq_len=args.seq_len,
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed, threads=args.threads,
                   ce_fraction=args.ce_fraction, ce_weight=args.ce_weight, unroll=args.unroll,
                   draft_vocab=args.draft_vocab, prompt_set=args.prompt_set, init=args.init)
    vocab = result.get("draft_vocab")
    print(json.dumps({**{k: v for k, v in result.items() if k not in ("config", "draft_vocab")},
                      "draft_vocab_size": len(vocab) if vocab else None}, indent=1))
    return 0


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from lambdasplit.zoo import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(model), padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]


def prompt_lengths(model: str, prompts: list[str]) -> list[int]:
    """Tokens of each prompt (chat template included) as generate_data tokenizes it: where its answer starts."""
    tokenizer = _tokenizer(model)
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in _chat_texts(tokenizer, prompts)]


def generate_data(model: str, prompts: list[str], new_tokens: int, batch: int, progress) -> list[list[int]]:
    """prompt + greedy answer token ids, one list per prompt (transformers' batched generate, left padding)."""
    import torch

    from transformers import AutoModelForCausalLM

    from lambdasplit.zoo import resolve

    tokenizer = _tokenizer(model)
    lm = AutoModelForCausalLM.from_pretrained(resolve(model), dtype=torch.float32).eval()
    sequences = []
    task = progress.add_task("draft data: answers", total=len(prompts))
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        enc = tokenizer(_chat_texts(tokenizer, chunk), return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = lm.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for row, mask in zip(out, enc["attention_mask"]):
            ids = row[int((mask == 0).sum()):].tolist()  # drop the left padding
            while ids and ids[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id != tokenizer.eos_token_id:
                ids.pop()
            if tokenizer.eos_token_id in ids[int(mask.sum()):]:  # cut after the first EOS of the answer
                cut = ids.index(tokenizer.eos_token_id, int(mask.sum()))
                ids = ids[:cut + 1]
            sequences.append(ids)
        progress.advance(task, len(chunk))
    return sequences


def extract_features(device, sequences: list[list[int]], progress) -> list[torch.Tensor]:
    """Every position's last-layer features (before the final norm), as the device's tail sees them."""
    import torch

    from lambdasplit.client.generation import StepModel

    features = []
    task = progress.add_task("draft data: features", total=len(sequences))
    for ids in sequences:
        model = StepModel(device.head.fork(), None, device.tail.fork())
        model.step(0, ids, last=1)
        features.append(model.features.clone())
        progress.advance(task)
    return features


def cached_features(path: Path, key: dict, device, sequences: list[list[int]], progress) -> list[torch.Tensor]:
    """extract_features, kept in `path` under the data's key (a rerun on the same data skips the forward)."""
    import torch

    if path.exists():
        cached = torch.load(path)
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["features"]
    features = extract_features(device, sequences, progress)
    torch.save({"key": key, "features": features}, path)
    return features


def train(*, model: str, out: Path, prompts: int, new_tokens: int, generate_batch: int, steps: int, minutes: float,
          seq_len: int, batch_size: int, lr: float, seed: int, threads: int, ce_fraction: float = DEFAULTS["ce_fraction"],
          ce_weight: float = DEFAULTS["ce_weight"], unroll: int = DEFAULTS["unroll"],
          draft_vocab: int = DEFAULTS["draft_vocab"], prompt_set: str = "templates", init: Path | None = None) -> dict:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from lambdasplit.client.device import DeviceModel
    from lambdasplit.speculative.eagle import EagleHead, head_config
    from lambdasplit.zoo.draft_data import prompt_set as named_prompts

    torch.set_num_threads(threads)
    _seed(seed)
    began = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = DeviceModel.load(model)  # the whole model: features and the frozen embedding / norm / LM head
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    from rich.console import Console

    with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:  # stdout: the JSON summary
        progress.add_task = _with_info(progress.add_task)
        data_file = out / "data.pt"
        wanted = {"model": device.checkpoint.fingerprint, "prompts": prompts, "new_tokens": new_tokens, "seed": seed}
        if prompt_set != "templates":  # (the templated set's key is what it always was)
            wanted["prompt_set"] = prompt_set
        cached = torch.load(data_file) if data_file.exists() else None
        prompt_list = named_prompts(prompt_set, prompts, seed)
        if cached is not None and cached["key"] == wanted:
            sequences = cached["sequences"]
        else:
            sequences = generate_data(model, prompt_list, new_tokens, generate_batch, progress)
            torch.save({"key": wanted, "sequences": sequences}, data_file)
        answer_starts = prompt_lengths(model, prompt_list)
        features = cached_features(out / "features.pt", wanted, device, sequences, progress)
        data_seconds = time.perf_counter() - began

        holdout = max(1, len(sequences) // 20)
        order = list(range(len(sequences)))
        random.Random(seed).shuffle(order)
        test_ids, train_ids = order[:holdout], order[holdout:]
        vocab_list = draft_vocabulary([sequences[i] for i in train_ids], [answer_starts[i] for i in train_ids],
                                      draft_vocab)
        if init is not None:
            head, init_meta = EagleHead.load(Path(init))
            head.float()
            if vocab_list is not None and init_meta.get("draft_vocab"):
                vocab_list = sorted(set(vocab_list) | set(init_meta["draft_vocab"]))
        else:
            head = EagleHead(head_config(device.checkpoint.config))
        vocab = torch.tensor(vocab_list) if vocab_list is not None else None
        embed, tail = device.head.embed, device.tail
        for module in (embed, tail.norm, tail.lm_head):
            module.requires_grad_(False)
        step, losses = fit(head, embed, tail, sequences, features, answer_starts, train_ids, steps=steps,
                           minutes=minutes, seq_len=seq_len, batch_size=batch_size, lr=lr, ce_fraction=ce_fraction,
                           ce_weight=ce_weight, unroll=unroll, vocab=vocab, progress=progress)
        figures = holdout_figures(head, embed, tail, [sequences[i] for i in test_ids],
                                  [features[i] for i in test_ids], [answer_starts[i] for i in test_ids], vocab)
    meta = {
        "target": model, "target_fingerprint": device.checkpoint.fingerprint,
        "command": "lambdasplit " + " ".join(sys.argv[1:]) if sys.argv and "zoo" in sys.argv else None,
        "seed": seed, "prompt_set": prompt_set, "init": str(init) if init is not None else None,
        "prompts": len(sequences), "tokens": sum(len(s) for s in sequences), "steps": step,
        "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "ce_fraction": ce_fraction,
        "ce_weight": ce_weight, "unroll": unroll, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "holdout_sequences": len(test_ids), "holdout_next_token_accuracy": figures["answer"],
        "holdout_next_token_accuracy_all_positions": figures["all"],
        "holdout_accepted_per_chain_of_5": figures["accepted_per_chain"],
        "holdout_draft_vocab_coverage": figures["vocab_coverage"],
        "data_seconds": data_seconds, "seconds": time.perf_counter() - began,
        "parameters": sum(p.numel() for p in head.parameters()),
        "stored_dtype": "float16 (trained in fp32; loaded into fp32)",
        "draft_vocab": vocab_list,  # last: the long list
    }
    head.half().save(out, meta)  # fp16 halves the file (7 MB for SmolLM2); EagleHead.load casts it back to fp32
    return {**meta, "out": str(out)}


def fit(head, embed, tail, sequences, features, answer_starts, train_ids, *, steps: int, minutes: float, seq_len: int,
        batch_size: int, lr: float, ce_fraction: float, ce_weight: float, unroll: int, vocab, progress):
    """Train `head` in place on random windows of the training sequences; returns (steps done, losses)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 50)
    task = progress.add_task("draft head: training", total=steps)
    started, budget = time.perf_counter(), 60 * minutes
    losses, step = [], 0
    head.train()
    while step < steps and time.perf_counter() - started < budget:
        # The cosine decays over whichever budget runs out first (steps or minutes): a step-only
        # schedule stopped by --minutes would end at a high learning rate.
        done = max(step / steps, (time.perf_counter() - started) / budget)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        batch = [_window(sequences[i], features[i], answer_starts[i], seq_len)
                 for i in random.choices(train_ids, k=batch_size)]
        length = min(len(b[0]) for b in batch)
        tokens = torch.stack([b[0][:length] for b in batch])
        feats = torch.stack([b[1][:length] for b in batch])
        answer = torch.stack([b[2][:length] for b in batch])
        loss = _loss(head, embed, tail, tokens, feats, answer, noise=0.1, ce_fraction=ce_fraction,
                     ce_weight=ce_weight, unroll=unroll, vocab=vocab)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        progress.update(task, advance=1, info=f"loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    head.eval()
    return step, losses


def _with_info(add_task):
    def add(description, **kw):
        kw.setdefault("info", "")
        return add_task(description, **kw)
    return add


def _window(ids: list[int], feats: torch.Tensor, answer_start: int, seq_len: int):
    """A random window of seq_len + 1 positions of one sequence: tokens, features, and which positions are
    the answer's (the loss is taken there only, as EAGLE's loss mask does; the prompt is context)."""
    import torch

    n = len(ids)
    start = random.randrange(0, max(1, n - seq_len - 1) + 1) if n > seq_len + 1 else 0
    end = min(n, start + seq_len + 1)
    return torch.tensor(ids[start:end]), feats[start:end], torch.arange(start, end) >= answer_start


def _rms(x):
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def draft_vocabulary(sequences: list[list[int]], answer_starts: list[int], size: int) -> list[int] | None:
    """The `size` tokens most frequent in the answers (ties to the lower id), sorted; None: the whole vocabulary."""
    if not size:
        return None
    from collections import Counter

    counts = Counter(t for ids, start in zip(sequences, answer_starts) for t in ids[start:])
    return sorted(t for t, _ in sorted(counts.items(), key=lambda c: (-c[1], c[0]))[:size])


def unrolled_mask(n: int, step: int) -> torch.Tensor:
    """Additive [1, 1, n, (step + 1) n] mask of unrolled step `step` over the keys of steps 0 .. step: the
    query at pair p sees the true pairs 0 .. p - step (step 0's keys) and, of each later step i, only its
    own chain's pair p - step + i: what drafting the (step + 1)-th token after committed pair p - step sees."""
    import torch

    p = torch.arange(n)[:, None]
    q = torch.arange(n)[None, :]
    blocks = [q <= p - step] + [q == p - step + i for i in range(1, step + 1)]
    allowed = torch.cat(blocks, dim=1)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))[None, None]


def unrolled(head, features, embeddings, steps: int) -> list:
    """The head's predictions over pairs (f_p, x_{p+1}) for `steps` chained steps: step 0 from the true
    features (teacher-forced), step j from step j - 1's prediction at the previous pair, as drafting feeds
    its own output back. Output j at pair p predicts f_{p+1} with true context up to pair p - j; it is
    meaningful for p >= j. One decoder layer, its keys kept across steps in one cache."""
    import torch
    from transformers import DynamicCache

    if steps == 1:
        return [head(features, embeddings)]
    cache = DynamicCache(config=head.config)
    n = features.shape[1]
    positions = torch.arange(n)[None]
    outputs, inputs = [], features
    for step in range(steps):
        hidden = head.fc(torch.cat([embeddings, inputs], dim=-1))
        out = head.layer(hidden, attention_mask=unrolled_mask(n, step), position_ids=positions,
                         past_key_values=cache, use_cache=True, position_embeddings=head.rotary(hidden, positions))
        out = out[0] if isinstance(out, tuple) else out
        outputs.append(out)
        inputs = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # pair p takes f^_p from pair p - 1
    return outputs


def vocab_logits(tail, features, vocab):
    """The target's logits (its norm, LM head and any scaling) over `vocab` (a LongTensor; None: all)."""
    import torch

    normed = tail.norm(features)
    if vocab is None:
        return tail.family.logits(tail.config, tail.lm_head(normed))
    bias = tail.lm_head.bias[vocab] if getattr(tail.lm_head, "bias", None) is not None else None
    return tail.family.logits(tail.config, torch.nn.functional.linear(normed, tail.lm_head.weight[vocab], bias))


def _loss(head, embed, tail, tokens, feats, answer, noise: float, ce_fraction: float = 1.0, ce_weight: float = 0.1,
          unroll: int = 1, vocab=None):
    """Pairs (f_t, x_{t+1}) -> f_{t+1} at the answer's positions t + 1, for each of `unroll` chained steps
    (averaged): smooth-L1 on the features over the target's RMS at t + 1 (the scale of EAGLE's normed
    features) + ce_weight x CE against the target's distribution over `vocab` (on a random `ce_fraction`
    of the positions). The input noise is uniform, +-noise x RMS of f_t, on the true features only."""
    import torch

    inputs = feats[:, :-1]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise * _rms(inputs)
    predictions = unrolled(head, inputs, embed(tokens[:, 1:]), unroll)
    target = feats[:, 1:]
    chosen = torch.rand(target.shape[:2]) < ce_fraction
    with torch.no_grad():
        target_probs = torch.softmax(vocab_logits(tail, target[chosen], vocab), -1) if ce_fraction and tail else None
    total = 0.0
    for step, predicted in enumerate(predictions):
        mask = answer[:, 1:].clone()
        mask[:, :step] = False  # pairs before the chain's start: no true context to draft from
        if not mask.any():
            total = total + (predicted * 0).sum()
            continue
        scale = _rms(target[mask]).detach()
        loss = torch.nn.functional.smooth_l1_loss(predicted[mask] / scale, target[mask] / scale)
        ce_rows = mask[chosen]
        if target_probs is not None and ce_rows.any():
            log_probs = torch.log_softmax(vocab_logits(tail, predicted[chosen][ce_rows], vocab), -1)
            loss = loss + ce_weight * -(target_probs[ce_rows] * log_probs).sum(-1).mean()
        total = total + loss
    return total / len(predictions)


def holdout_figures(head, embed, tail, sequences, features, answer_starts, vocab=None, k: int = 5) -> dict:
    """On held-out sequences: how often the head's one-step draft equals the target's next token (over the
    answers' positions, what drafting sees, and over all positions), and the mean number of tokens a
    greedy chain of k drafts gets accepted from each answer position (the target verifying; the step
    oracle of bench wan's tokens per round trip, minus the one token every round commits)."""
    import torch

    right = {"answer": 0, "all": 0}
    total = {"answer": 0, "all": 0}
    accepted, starts, covered, answer_tokens = 0, 0, 0, 0
    vocab_ids = vocab if vocab is not None else None
    with torch.no_grad():
        for ids, feats, answer_start in zip(sequences, features, answer_starts):
            tokens = torch.tensor([ids])
            outputs = unrolled(head, feats[None, :-1], embed(tokens[:, 1:]), k)
            greedy = torch.argmax(vocab_logits(tail, feats[1:], None), -1)  # target's next token after pair p
            drafts = []
            for out in outputs:
                d = torch.argmax(vocab_logits(tail, out[0], vocab), -1)
                drafts.append(vocab_ids[d] if vocab_ids is not None else d)
            hit = drafts[0] == greedy
            answer = torch.arange(1, len(ids)) >= answer_start
            right["all"] += int(hit.sum())
            total["all"] += hit.numel()
            right["answer"] += int(hit[answer].sum())
            total["answer"] += int(answer.sum())
            if vocab_ids is not None:
                members = torch.zeros(int(max(greedy.max(), vocab_ids.max())) + 1, dtype=torch.bool)
                members[vocab_ids] = True
                covered += int(members[greedy[answer]].sum())
            answer_tokens += int(answer.sum())
            n = len(ids) - 1  # pairs
            for s in range(max(0, answer_start - 1), n - k + 1):  # chains starting at committed pair s
                length = 0
                while length < k and int(drafts[length][s + length]) == int(greedy[s + length]):
                    length += 1
                accepted += length
                starts += 1
    figures = {k_: right[k_] / total[k_] if total[k_] else 0.0 for k_ in right}
    figures["accepted_per_chain"] = accepted / starts if starts else 0.0
    figures["vocab_coverage"] = covered / answer_tokens if vocab_ids is not None and answer_tokens else 1.0
    return figures
