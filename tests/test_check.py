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


def test_unknown_family_is_refused_and_can_try_an_adapter(tmp_path, capsys, monkeypatch):
    """A family lambdasplit does not know (here a registered copy of Llama, as custom-code models
    are) is refused, with a pointer to check; check --as-family llama then measures it exact, and
    from then on the split runs it (over a real socket) exactly as the unsplit model."""
    from lambdasplit.client import DeviceModel, RemoteBody
    from lambdasplit.errors import UnsupportedModelError
    from lambdasplit.llm import family_for
    from lambdasplit.server import BodyServer, BodyService
    from tiny_models import train_tokenizer

    monkeypatch.setenv("LAMBDASPLIT_CACHE", str(tmp_path / "cache"))  # where passing checks are recorded
    transformers.AutoConfig.register(CloneConfig.model_type, CloneConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(CloneConfig, CloneForCausalLM, exist_ok=True)
    config = CloneConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
    folder = tmp_path / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CloneForCausalLM(config).save_pretrained(folder)
    train_tokenizer(folder)  # ids < 300 in the tests' corpus tokenizer too; the device side loads one
    assert main(["check", "--model", str(folder)]) == 2
    assert "`lambdasplit check --model M --as-family F`" in capsys.readouterr().err
    assert main(["check", "--model", str(folder), "--as-family", "gpt2"]) == 2  # GPT-2's modules are not there
    assert "the gpt2 adapter does not fit this model" in capsys.readouterr().err
    with pytest.raises(UnsupportedModelError, match="once it does, serve and generate accept"):
        family_for(config)  # a failed check records nothing
    code, report = check(capsys, "--model", str(folder), "--as-family", "llama")
    assert code == 0 and report["exact"] and report["adapter"] == "llama" and report["recorded"]
    assert family_for(config) is FAMILIES["llama"]
    with pytest.raises(UnsupportedModelError):  # another architecture of the family is not covered
        family_for(CloneConfig(**{**config.to_dict(), "hidden_act": "gelu"}))

    prompt = [5, 17, 42, 99, 7, 3]
    reference = CloneForCausalLM.from_pretrained(folder).eval().generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=8,
        min_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    server = BodyServer([BodyService(str(folder), "1:3")]).start_in_thread()
    try:
        device = DeviceModel.load(str(folder), "1:3")
        with RemoteBody.for_device(device, server.address) as body:
            result = device.generate(prompt, body=body, max_new_tokens=8, ignore_eos=True)
    finally:
        server.stop()
    assert result.token_ids == reference


def test_hybrid_family_is_refused_even_with_an_adapter(tmp_path, capsys):
    transformers.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2).save_pretrained(tmp_path)
    assert main(["check", "--model", str(tmp_path), "--random-weights", "--as-family", "llama"]) == 2
    assert "cannot be cut back" in capsys.readouterr().err
