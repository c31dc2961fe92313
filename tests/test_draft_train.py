"""The draft head trainer's recipe (zoo/draft_train.py): the answer mask lines up with the generated
data, and the regression is taken relative to each position's feature scale (the tail's features
before the final norm are ~15x larger than the normed features EAGLE regresses)."""

from __future__ import annotations

import random

import torch
from rich.progress import Progress

from lambdasplit.client import DeviceModel
from lambdasplit.zoo import draft_train
from lambdasplit.zoo.draft_data import training_prompts


def test_answer_starts_match_the_generated_data(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    prompts = training_prompts(3)
    with Progress(disable=True) as progress:
        sequences = draft_train.generate_data(folder, prompts, new_tokens=4, batch=2, progress=progress)
    starts = draft_train.prompt_lengths(folder, prompts)
    device = DeviceModel.load(folder)
    for prompt, ids, start in zip(prompts, sequences, starts):
        assert ids[:start] == device.encode(prompt)  # the prompt, chat template included
        assert 0 < len(ids) - start <= 4  # then the answer


def test_window_marks_the_answer_positions():
    random.seed(1)
    ids, feats = list(range(40)), torch.randn(40, 8)
    for _ in range(20):
        tokens, window_feats, answer = draft_train._window(ids, feats, answer_start=25, seq_len=16)
        assert len(tokens) == len(window_feats) == len(answer) == 17
        assert answer.tolist() == [int(t) >= 25 for t in tokens]
        assert torch.equal(window_feats, feats[tokens])


class _Scaled(torch.nn.Module):
    """A stand-in head that predicts the true next features times 1.1 (so its error scales with them)."""

    def __init__(self, next_features):
        super().__init__()
        self.next_features = next_features

    def forward(self, features, embeddings):
        return self.next_features * 1.1


def test_regression_is_relative_to_the_feature_scale():
    torch.manual_seed(0)
    feats = torch.randn(2, 9, 16)
    tokens = torch.zeros(2, 9, dtype=torch.long)
    answer = torch.ones(2, 9, dtype=torch.bool)
    embed = torch.nn.Embedding(4, 16)
    losses = []
    for scale in (1.0, 30.0):
        scaled = feats * scale
        losses.append(float(draft_train._loss(_Scaled(scaled[:, 1:]), embed, None, tokens, scaled, answer,
                                              noise=0.0, ce_fraction=0.0)))
    assert losses[0] > 0 and abs(losses[0] - losses[1]) < 1e-6 * losses[0]


def test_prompt_positions_carry_no_loss():
    torch.manual_seed(0)
    feats = torch.randn(1, 9, 16)
    tokens = torch.zeros(1, 9, dtype=torch.long)
    embed = torch.nn.Embedding(4, 16)

    def loss(features, answer):
        return float(draft_train._loss(_Scaled(features[:, 1:]), embed, None, tokens, features, answer,
                                       noise=0.0, ce_fraction=0.0))

    answer = torch.zeros(1, 9, dtype=torch.bool)
    assert loss(feats, answer) == 0.0  # a window inside the prompt: nothing to learn
    answer[0, 5:] = True
    other = feats.clone()
    other[0, 1:5] += 100.0  # the prompt positions' targets (and the stand-in's predictions there)
    assert loss(feats, answer) > 0 and abs(loss(feats, answer) - loss(other, answer)) < 1e-6
