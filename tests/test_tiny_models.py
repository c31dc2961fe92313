"""The tiny random models and tokenizer that the rest of the test suite builds on."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_models import FAMILIES, SLIDING_WINDOW

PROMPT = "Once upon a time there was a cat who lived in a quiet house"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_reloads_and_generates(tiny_model_dir, family):
    path = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1] :]
    assert len(out) == 30  # no early eos (untied models cannot emit it, see _perturb)
    assert len(set(out.tolist())) >= 5, out.tolist()


def test_build_is_deterministic(tiny_model_dir, tmp_path):
    from tiny_models import build_tiny_model

    ids = torch.arange(40).unsqueeze(0)
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3"))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model("qwen3", tmp_path))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_matters(tiny_model_dir, family):
    """Beyond SLIDING_WINDOW positions, the windowed model differs from a full-attention one."""
    windowed = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family))
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family, sliding_window=4096))
    ids = torch.arange(3, 3 + 2 * SLIDING_WINDOW).unsqueeze(0)
    with torch.no_grad():
        a, b = windowed(ids).logits[0], full(ids).logits[0]
    torch.testing.assert_close(a[:SLIDING_WINDOW], b[:SLIDING_WINDOW])
    assert (a[SLIDING_WINDOW:] - b[SLIDING_WINDOW:]).abs().max() > 1e-3


def test_family_peculiarities(tiny_model_dir):
    qwen2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen2")).config
    assert {"full_attention", "sliding_attention"} == set(qwen2.layer_types)
    gemma2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gemma2"))
    assert gemma2.config.attn_logit_softcapping and gemma2.config.final_logit_softcapping
    assert gemma2.lm_head.weight is gemma2.model.embed_tokens.weight
    phi3 = AutoModelForCausalLM.from_pretrained(tiny_model_dir("phi3"))
    assert hasattr(phi3.model.layers[0].self_attn, "qkv_proj")
    for family in ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]:
        config = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).config
        assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")).config.n_positions >= 512


def test_large_vocab_override(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", num_layers=2, vocab_size=1000))
    assert model.config.vocab_size == 1000 and model.config.num_hidden_layers == 2


def test_tokenizer(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    text = "Hello, world! The café costs 3.50 dollars ✓\n  indented"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.bos_token_id == tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
