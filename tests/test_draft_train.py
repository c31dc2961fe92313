"""The draft head trainer's recipe (zoo/draft_train.py): the answer mask lines up with the generated
data, and the regression is taken relative to each position's feature scale (the tail's features
before the final norm are ~15x larger than the normed features EAGLE regresses)."""

from __future__ import annotations

import random

import pytest
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


def _tiny_head(dim=32):
    from transformers import LlamaConfig

    from lambdasplit.speculative.eagle import EagleHead, head_config

    torch.manual_seed(0)
    return EagleHead(head_config(LlamaConfig(hidden_size=dim, num_attention_heads=4, num_key_value_heads=2))).eval()


def test_unrolled_steps_equal_the_drafting_chain():
    """Unrolled step j at pair p (training-time test) is exactly what drafting computes for the (j+1)-th
    token after committed pair p - j: true pairs in the head's cache, then its own predictions fed back."""
    from transformers import DynamicCache

    head = _tiny_head()
    feats, embeddings = torch.randn(1, 12, 32) * 3, torch.randn(1, 12, 32)
    with torch.no_grad():
        outputs = draft_train.unrolled(head, feats, embeddings, steps=4)
        assert torch.allclose(outputs[0], head(feats, embeddings), atol=1e-5)  # step 0: teacher-forced
        for s in (0, 3, 7):
            cache = DynamicCache(config=head.config)
            predicted = head(feats[:, :s + 1], embeddings[:, :s + 1], 0, cache)[:, -1:]
            assert torch.allclose(predicted, outputs[0][:, s:s + 1], atol=1e-5)
            for j in range(1, 4):
                predicted = head(predicted, embeddings[:, s + j:s + j + 1], s + j, cache)
                assert torch.allclose(predicted, outputs[j][:, s + j:s + j + 1], atol=1e-5), (s, j)


def test_unrolled_loss_trains_the_later_steps():
    """With unroll > 1 the loss depends on the head's own fed-back predictions (not only on step 0)."""
    head = _tiny_head()
    feats = torch.randn(2, 10, 32)
    tokens = torch.randint(0, 4, (2, 10))
    answer = torch.ones(2, 10, dtype=torch.bool)
    embed = torch.nn.Embedding(4, 32)
    one = draft_train._loss(head, embed, None, tokens, feats, answer, noise=0.0, ce_fraction=0.0, unroll=1)
    three = draft_train._loss(head, embed, None, tokens, feats, answer, noise=0.0, ce_fraction=0.0, unroll=3)
    one, three = float(one.detach()), float(three.detach())
    assert one > 0 and abs(one - three) > 1e-4


def test_draft_vocabulary_is_the_answers_most_frequent_tokens():
    sequences = [[9, 9, 1, 2, 2, 3], [9, 2, 4, 4, 4]]
    assert draft_train.draft_vocabulary(sequences, [2, 1], 2) == [2, 4]  # prompt tokens (9) not counted
    assert draft_train.draft_vocabulary(sequences, [2, 1], 0) is None


def test_a_draft_vocabulary_limits_drafts_and_keeps_output_exact(tiny_model_dir):
    from lambdasplit.speculative.eagle import EagleHead, EagleSource, head_config

    device = DeviceModel.load(str(tiny_model_dir("llama")))
    prompt = device.encode("The quick brown fox", chat=False)
    plain = device.generate(prompt, max_new_tokens=12, ignore_eos=True)
    torch.manual_seed(0)
    head = EagleHead(head_config(device.checkpoint.config)).eval()
    vocab = [t for t in range(10, 30)]
    source = EagleSource(head, device.head.embed, device.tail, vocab=vocab)
    drafted = []
    source_propose = source.propose

    def recording(sequence, k):
        draft = source_propose(sequence, k)
        drafted.append((set(sequence), list(draft.tokens)))
        return draft

    source.propose = recording
    result = device.generate(prompt, max_new_tokens=12, ignore_eos=True, draft_tokens=3, speculate=source)
    assert result.token_ids == plain.token_ids and result.drafted > 0
    for seen, tokens in drafted:
        assert all(t in vocab or t in seen for t in tokens)
    assert set(prompt) <= set(source.vocab)  # the sequence's own tokens joined the vocabulary


def test_prompt_sets_are_seeded_distinct_and_disjoint_from_the_evaluation():
    from lambdasplit.bench.wan import PROMPTS
    from lambdasplit.zoo.draft_data import prompt_set

    diverse = prompt_set("diverse", 3000)
    assert len(diverse) == len(set(diverse)) > 2 * 1193  # many more distinct prompts than the templated set
    assert prompt_set("diverse", 50) == diverse[:50]  # a count is a prefix of the same seeded order
    assert prompt_set("diverse", 50, seed=1) != diverse[:50]
    assert prompt_set("templates", 20) == training_prompts(20)
    evaluation = {p for _, p in PROMPTS}
    assert not evaluation & set(diverse)
    kinds = {"word": "the word", "code": "function that", "stdlib": "in Python? Show", "summary": "passage"}
    for kind, marker in kinds.items():
        assert any(marker in p for p in diverse), kind
    with pytest.raises(ValueError, match="templates or diverse"):
        prompt_set("other", 3)
