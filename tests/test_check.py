"""`lambdasplit check`: exact adapters pass, a broken adapter is caught and exits non-zero,
a config alone is checked with random weights, and an unknown family can try an adapter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from lambdasplit.cli import main
from lambdasplit.llm.families import FAMILIES


def check(capsys, *args) -> tuple[int, dict]:
    code = main(["check", *args, "--new-tokens", "12", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_exact_adapter_passes_on_random_and_real_ids(tiny_model_dir, capsys):
    folder = tiny_model_dir("qwen3_moe")
    code, report = check(capsys, "--model", str(folder), "--split", "0:3", "--split", "3:3", "--split", "2:6")
    assert code == 0 and report["exact"]
    assert {(r["split"], r["inputs"]) for r in report["results"]} == {
        (s, i) for s in ("0:3", "3:3", "2:6") for i in ("random", "real")}
    assert all(r["max_logit_diff"] <= 1e-4 and r["first_diverging_token"] is None for r in report["results"])


@pytest.mark.parametrize("broken", [
    dict(logit_scale_attr="initializer_range"),  # an extra logit scale
    dict(mask_rule="full"),  # forgets the sliding window (16 < prompt + new tokens)
])
def test_broken_adapter_is_reported_and_exits_non_zero(broken, tiny_model_dir, capsys, monkeypatch):
    folder = tiny_model_dir("mistral")
    monkeypatch.setitem(FAMILIES, "mistral", dataclasses.replace(FAMILIES["mistral"], **broken))
    code, report = check(capsys, "--model", str(folder), "--split", "2:4")
    assert code == 1 and not report["exact"]
    assert all(r["max_logit_diff"] > 1e-3 for r in report["results"])
    # The table says so too.
    assert main(["check", "--model", str(folder), "--split", "2:4", "--new-tokens", "12"]) == 1
    assert "NOT EXACT" in capsys.readouterr().out


def test_config_only_with_random_weights(tmp_path, capsys):
    transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, initializer_range=0.2,
    ).save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    code, report = check(capsys, "--model", str(tmp_path), "--random-weights", "--dtype", "bfloat16")
    assert code == 0 and report["exact"] and report["tolerance"] == 0
    assert {r["inputs"] for r in report["results"]} == {"random"}  # no tokenizer, so no real text


class CloneConfig(transformers.LlamaConfig):
    model_type = "llama_clone_for_tests"


class CloneForCausalLM(transformers.LlamaForCausalLM):
    config_class = CloneConfig


def test_unknown_family_is_refused_and_can_try_an_adapter(tmp_path, capsys):
    """A family lambdasplit does not know (here a registered copy of Llama, as custom-code models
    are) is refused, with a pointer to check; check --as-family llama then measures it exact."""
    transformers.AutoConfig.register(CloneConfig.model_type, CloneConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(CloneConfig, CloneForCausalLM, exist_ok=True)
    config = CloneConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CloneForCausalLM(config).save_pretrained(tmp_path)
    assert main(["check", "--model", str(tmp_path)]) == 2
    assert "lambdasplit check" in capsys.readouterr().err
    code, report = check(capsys, "--model", str(tmp_path), "--as-family", "llama")
    assert code == 0 and report["exact"] and report["adapter"] == "llama"
    assert main(["check", "--model", str(tmp_path), "--as-family", "gpt2"]) == 2  # GPT-2's modules are not there
    assert "the gpt2 adapter does not fit this model" in capsys.readouterr().err


def test_hybrid_family_is_refused_even_with_an_adapter(tmp_path, capsys):
    transformers.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2).save_pretrained(tmp_path)
    assert main(["check", "--model", str(tmp_path), "--random-weights", "--as-family", "llama"]) == 2
    assert "cannot be cut back" in capsys.readouterr().err
