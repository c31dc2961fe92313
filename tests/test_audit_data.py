"""The attacker's training text, the held-out text and the test prompts are disjoint."""

from __future__ import annotations

import json
import re

from lambdasplit.audit.inverters import shipped_text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_prompts_share_no_phrase_with_the_attackers_text():
    prompts = json.loads(shipped_text("prompts.json"))["prompts"]
    train, heldout = shipped_text("kjv_train.txt"), shipped_text("kjv_heldout.txt")
    assert len(prompts) >= 8
    for prompt in prompts:
        # no 4-word phrase of any test prompt occurs in the attacker's training or the held-out text
        assert not _ngrams(prompt, 4) & _ngrams(train, 4), prompt
        assert not _ngrams(prompt, 4) & _ngrams(heldout, 4), prompt


def test_training_and_heldout_text_are_disjoint():
    train_lines = set(shipped_text("kjv_train.txt").splitlines())
    heldout_lines = set(shipped_text("kjv_heldout.txt").splitlines())
    assert not (train_lines & heldout_lines) - {""}
    # and hardly a long phrase is shared: John 1:23 and Matthew 3:3 both quote Isaiah 40:3
    shared = _ngrams(shipped_text("kjv_heldout.txt"), 8) & _ngrams(shipped_text("kjv_train.txt"), 8)
    assert len(shared) <= 2, shared


def test_training_sequences_come_from_the_training_text_only(tiny_model_dir):
    from lambdasplit.audit.inverters import build_sequences
    from lambdasplit.client.device import DeviceModel

    device = DeviceModel.load(str(tiny_model_dir("llama", num_layers=2, hidden_size=32)), "1:1")
    sequences, vocab, unigram = build_sequences(device, shipped_text("kjv_train.txt"), max_tokens=600,
                                                random_fraction=0.0)
    decoded = " ".join(device.tokenizer.decode(s) for s in sequences)
    prompts = json.loads(shipped_text("prompts.json"))["prompts"]
    for prompt in prompts:
        assert not _ngrams(prompt, 4) & _ngrams(decoded, 4)
    assert "wisdom" in decoded  # Proverbs, as shipped
