"""Speculative sampling keeps plain sampling's output distribution exactly: a chi-square test
over a few thousand seeded draws on a model with an 8-token vocabulary, for the first
sampled token and the third, with a sampling draft model (the min(1, p/q) rule with its
residual) and with single-token drafts (point-mass q). In-process, tiny: a few seconds.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from lambdasplit.client import DeviceModel
from lambdasplit.client.generation import Sampler, Sampling, generate_ids
from lambdasplit.speculative import Draft
from lambdasplit.speculative.draft_model import DraftModelSource

VOCAB = 8
PROMPT = [3, 5, 7, 4]
DRAWS = 1500
TEMPERATURE = 1.5  # flatter than the raw logits: every token is drawn often enough for the test


def _tiny(tiny_model_dir, seed):
    return tiny_model_dir("llama", num_layers=2, hidden_size=32, vocab_size=VOCAB, seed=seed, initializer_range=0.5)


@torch.no_grad()
def exact_marginals(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """P(first token) and P(third token) of plain sampling, by enumeration with transformers itself."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def next_probs(ids):
        logits = model(torch.tensor([ids])).logits[0, -1]
        logits[[0, 1, 2]] = float("-inf")  # ignore_eos masks the special tokens (EOS among them)
        return torch.softmax(logits / TEMPERATURE, -1).double()

    first = next_probs(PROMPT)
    third = torch.zeros(VOCAB, dtype=torch.float64)
    for a, b in itertools.product(range(VOCAB), repeat=2):
        if first[a] == 0:
            continue
        second = next_probs(PROMPT + [a])
        if second[b] == 0:
            continue
        third += first[a] * second[b] * next_probs(PROMPT + [a, b])
    return first, third


class ConstantSource:
    name = "constant"

    def propose(self, sequence, k):
        return Draft([4] * k)

    def observe(self, sequence, step):
        pass


def _draws(device, make_source):
    firsts, thirds = [], []
    for seed in range(DRAWS):
        sampler = Sampler(Sampling(temperature=TEMPERATURE, seed=seed))
        source = make_source(seed)
        result = generate_ids(device.head, None, device.tail, PROMPT, max_new_tokens=3, sampler=sampler,
                              eos_ids={0, 1, 2}, ignore_eos=True, speculate=source, draft_tokens=2)
        firsts.append(result.token_ids[0])
        thirds.append(result.token_ids[2])
    return torch.bincount(torch.tensor(firsts), minlength=VOCAB), torch.bincount(torch.tensor(thirds), minlength=VOCAB)


def _p_value(counts, probs):
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    target, draft = _tiny(tiny_model_dir, 0), _tiny(tiny_model_dir, 1)
    return target, draft, DeviceModel.load(str(target)), DeviceModel.load(str(draft))


def test_sampling_draft_model_keeps_the_distribution(models):
    target, draft_folder, device, draft_device = models
    first, third = exact_marginals(target)
    draft_first, _ = exact_marginals(draft_folder)
    assert (first - draft_first).abs().sum() > 0.3, "the draft must disagree with the target for the test to mean much"
    draft_model = DraftModelSource.load(str(draft_folder), device).model

    def source(seed):
        return DraftModelSource(draft_model, VOCAB, Sampler(Sampling(temperature=TEMPERATURE, seed=10**6 + seed)))

    counts_first, counts_third = _draws(device, source)
    assert _p_value(counts_first, first) > 1e-3
    assert _p_value(counts_third, third) > 1e-3
    # the test has power: the same counts are far from the draft's own distribution
    assert _p_value(counts_first, draft_first) < 1e-6


def test_single_token_drafts_keep_the_distribution(models):
    target, _, device, _ = models
    first, third = exact_marginals(target)
    counts_first, counts_third = _draws(device, lambda seed: ConstantSource())
    assert _p_value(counts_first, first) > 1e-3
    assert _p_value(counts_third, third) > 1e-3
    assert counts_first[4] < DRAWS * 0.9  # the always-drafted token was not simply accepted
