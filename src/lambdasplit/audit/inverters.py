"""Learned inverters: the attacker with auxiliary data.

The attacker computes hidden states of public text (here: King James Bible text shipped in
audit/data/kjv_train.txt, disjoint from the test prompts) through the public head, and
trains a model to map a hidden state back to its token. No search through the head: this
is the WAN paper's attacker, and the one that keeps working (approximately) when the
device's head differs a little from the public one (fine-tuned), where exact search fails.

    TrainingSet        token sequences (chat template around public text, plus random-token
                       sequences so every class of the output vocabulary has examples) and
                       their hidden states after layers X for every audited X, in one pass
    MLPInverter        per position: LayerNorm -> Linear -> GELU -> Linear (the WAN paper's)
    GRUInverter        per sequence: LayerNorm -> Linear -> bidirectional GRU -> Linear

Output vocabulary (stated in every report): the token ids that occur in the training text
plus the `common` lowest ids (BPE assigns low ids to early, frequent merges). Tokens
outside it can never be predicted; the report gives the coverage of the test tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn

from lambdasplit.llm.segments import Head, LayerStack


def shipped_text(name: str) -> str:
    return resources.files("lambdasplit.audit").joinpath("data", name).read_text(encoding="utf-8")


@dataclass
class TrainingSet:
    sequences: list[list[int]]
    features: dict[int, list[torch.Tensor]]  # X -> per sequence [n, D] hidden states after layer X
    vocab: torch.Tensor  # output classes: sorted token ids
    unigram: torch.Tensor  # token ids of the public text, most frequent first

    def flat(self, x: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.features[x]), torch.tensor([t for s in self.sequences for t in s])


def build_sequences(device, text: str, *, max_tokens: int, chunk: int = 32, random_fraction: float = 0.3,
                    common: int = 4096, seed: int = 0) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Template-wrapped public text ('user' chunk then 'assistant' chunk) and random-token sequences."""
    rng = random.Random(seed)
    tokenizer = device.tokenizer
    words = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    counts = torch.bincount(torch.tensor(words), minlength=len(tokenizer))
    unigram = counts.argsort(descending=True)[: int((counts > 0).sum())]
    vocab_size = device.head.embed.weight.shape[0]
    vocab = torch.tensor(sorted(set(words) | set(range(min(common, vocab_size)))))
    # The template's fixed prefix and suffix around a user message (the attacker knows the template).
    from lambdasplit.audit.capture import content_span

    probe = device.encode("x")
    start, end = content_span(device, "x")
    prefix, suffix = probe[:start], probe[end:]
    sequences = []
    for i in range(0, len(words) - 2 * chunk, 2 * chunk):
        user = tokenizer.decode(words[i:i + chunk])
        sequences.append(device.encode(user) + words[i + chunk:i + 2 * chunk])
    pool = vocab.tolist()
    for _ in range(int(len(sequences) * random_fraction / (1 - random_fraction))):
        body = [rng.choice(pool) for _ in range(2 * chunk)]
        sequences.append(prefix + body[:chunk] + suffix + body[chunk:])
    rng.shuffle(sequences)
    return sequences, vocab, unigram


@torch.inference_mode()
def head_features(head: Head, sequences: list[list[int]], depths: list[int], progress=None) -> dict[int, list[torch.Tensor]]:
    """Hidden states after each layer depth in `depths`, for every sequence, in one pass per sequence."""
    depths = sorted(depths)
    stack = head.stack
    stacks, begin = [], 0
    for x in depths:  # consecutive segments [begin, x) sharing the public head's layers
        stacks.append(LayerStack(stack.family, stack.config, stack.layers[begin:x], stack.rotary, begin, x))
        begin = x
    out: dict[int, list[torch.Tensor]] = {x: [] for x in depths}
    for ids in sequences:
        hidden = Head(head.embed, head.position_embed, LayerStack(stack.family, stack.config, [], None, 0, 0)).forward(
            torch.tensor([ids]), 0)
        for x, segment in zip(depths, stacks):
            hidden = segment.forward(hidden, 0)
            out[x].append(hidden[0].float().clone())
        if progress:
            progress()
    return out


class MLPInverter(nn.Module):
    """Per-position inverter: hidden state -> token class."""

    def __init__(self, dim: int, classes: int, width: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU(), nn.Linear(width, classes))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., classes]
        return self.net(hidden)


class GRUInverter(nn.Module):
    """Sequence inverter: sees the whole uplink sequence in both directions."""

    def __init__(self, dim: int, classes: int, width: int = 256):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU())
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * width, classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, classes]
        return self.out(self.gru(self.inp(hidden))[0])


def _classes(vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """token id -> class index (-100 outside the output vocabulary: ignored by the loss)."""
    table = torch.full((vocab_size,), -100, dtype=torch.long)
    table[vocab] = torch.arange(len(vocab))
    return table


def train_mlp(features: torch.Tensor, tokens: torch.Tensor, vocab: torch.Tensor, vocab_size: int, *,
              epochs: int = 6, batch: int = 256, width: int = 512, seed: int = 0, transform=None) -> MLPInverter:
    """`transform` (e.g. a defense's apply) is applied to each batch: the attacker trains on what it will see."""
    torch.manual_seed(seed)
    model = MLPInverter(features.shape[1], len(vocab), width)
    labels = _classes(vocab, vocab_size)[tokens]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps = epochs * ((len(features) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(features))
        for i in range(0, len(features), batch):
            idx = order[i:i + batch]
            x = features[idx] if transform is None else transform(features[idx])
            loss = nn.functional.cross_entropy(model(x), labels[idx], ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def train_gru(features: list[torch.Tensor], sequences: list[list[int]], vocab: torch.Tensor, vocab_size: int, *,
              epochs: int = 6, batch: int = 8, width: int = 256, seed: int = 0) -> GRUInverter:
    torch.manual_seed(seed)
    model = GRUInverter(features[0].shape[1], len(vocab), width)
    table = _classes(vocab, vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * ((len(features) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(features)).tolist()
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x = nn.utils.rnn.pad_sequence([features[j] for j in idx], batch_first=True)
            y = nn.utils.rnn.pad_sequence([table[torch.tensor(sequences[j])] for j in idx], batch_first=True,
                                          padding_value=-100)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.inference_mode()
def predict(model: nn.Module, hidden: torch.Tensor, vocab: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[T, D] uplink states of one session -> [T, k] token ids, best first."""
    logits = model(hidden[None])[0] if isinstance(model, GRUInverter) else model(hidden)
    return vocab[logits.topk(min(k, logits.shape[-1]), dim=-1).indices]
