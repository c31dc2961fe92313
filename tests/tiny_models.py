"""Tiny, randomly initialised Hugging Face causal LMs for tests (no network).

`train_tokenizer` trains a deterministic byte-level BPE tokenizer on the small
corpus in tests/data/corpus.txt. `build_tiny_model` builds a seeded random
``*ForCausalLM`` of one of `FAMILIES` and saves model + tokenizer into one
folder, so both ``AutoModelForCausalLM.from_pretrained(dest)`` and
``AutoTokenizer.from_pretrained(dest)`` work.

Each family exercises its peculiarities (see `_family_config`): grouped-query
attention everywhere it exists, sliding windows small enough (16) to matter
for prompts longer than 16 tokens, Gemma2 soft-capping and tied embeddings,
Phi3 fused projections and sliding windows, GPT-2 absolute positions, Qwen3 q/k norms.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = Path(__file__).parent / "data" / "corpus.txt"

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]

# ChatML-like; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2"]

# Small windows so that sliding-window attention changes results on > 16 positions.
SLIDING_WINDOW = 16

# The default 0.02 makes a random model's logits nearly flat, so greedy decoding
# collapses into one repeated token; a larger scale gives varied continuations.
INITIALIZER_RANGE = 0.2


def train_tokenizer(dest: Path, vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the shipped corpus and save it to `dest`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(keepends=True), trainer)

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(dest)
    return transformers.AutoTokenizer.from_pretrained(dest)


def _family_config(
    family: str, n_layers: int, hidden: int, vocab: int, ids: dict, overrides: dict
) -> transformers.PreTrainedConfig:
    """A small config of `family`. 4 query heads / 2 KV heads (GQA) where supported.

    `overrides` go into the constructor (not set afterwards) so that derived
    fields such as `layer_types` follow them.
    """
    heads, kv_heads = 4, 2
    head_dim = hidden // heads
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        **ids,
    )
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "mistral":
        # Every layer uses the same small window.
        cls = transformers.MistralConfig
        kw.update(sliding_window=SLIDING_WINDOW)
    elif family == "qwen2":
        # Layers >= max_window_layers get the window: a full/sliding mix. (Qwen2 also has qkv bias.)
        cls = transformers.Qwen2Config
        kw.update(use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=n_layers // 2)
    elif family == "qwen3":
        # Qwen3Config.head_dim defaults to 128 whatever hidden_size is; q_norm/k_norm act per head.
        cls = transformers.Qwen3Config
        kw.update(head_dim=head_dim)
    elif family == "gemma2":
        # Alternating sliding/full layers (the config default), tanh soft-capping, tied embeddings.
        # head_dim and query_pre_attn_scalar default to 256 whatever hidden_size is.
        cls = transformers.Gemma2Config
        kw.update(
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=SLIDING_WINDOW,
            # Caps near this model's actual score/logit ranges, so tanh really bends them
            # (the defaults 50/30 are never reached by a model this small).
            attn_logit_softcapping=10.0,
            final_logit_softcapping=1.0,
            tie_word_embeddings=True,
        )
    elif family == "phi3":
        # The modeling code fuses qkv_proj and gate_up_proj; a window on every layer, as Mistral.
        cls = transformers.Phi3Config
        kw.update(sliding_window=SLIDING_WINDOW)
    elif family == "gpt2":
        # Learned absolute positions, LayerNorm, Conv1D weights; no GQA in GPT-2. No dropout.
        cls = transformers.GPT2Config
        kw = dict(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=n_layers,
            n_head=heads,
            n_positions=1024,
            initializer_range=INITIALIZER_RANGE,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    elif family in MORE_FAMILIES:
        cls, kw = _more_family_config(family, kw, n_layers, head_dim)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {ALL_FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


# Families added for issue 17 (tests/test_families.py); FAMILIES above stays the seven of
# tests/test_llm_split.py. Each config turns on what the family does differently.
MORE_FAMILIES = [
    "olmo", "olmo2", "olmo3", "glm", "glm4", "helium", "arcee", "apertus", "seed_oss", "ernie4_5", "nemotron",
    "internlm3", "hunyuan_v1_dense", "phi", "persimmon", "stablelm", "gemma", "gemma3_text", "vaultgemma", "granite", "cohere", "cohere2",
    "smollm3", "exaone4", "ministral", "starcoder2", "gpt_neox", "gpt_bigcode",
    "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss",
]
ALL_FAMILIES = FAMILIES + MORE_FAMILIES
# Gemma-style families multiply the embedding by sqrt(hidden_size) (see `_perturb`).
SCALED_EMBEDDING_FAMILIES = {"gemma2", "gemma", "gemma3_text", "vaultgemma"}


def _mixed_layer_types(n_layers: int) -> list[str]:
    """Sliding layers with a full one every third layer, so every split cuts through both kinds."""
    return ["full_attention" if i % 3 == 1 else "sliding_attention" for i in range(n_layers)]


def _more_family_config(family: str, kw: dict, n_layers: int, head_dim: int):
    """(config class, constructor kwargs) of the families in MORE_FAMILIES."""
    experts = dict(num_local_experts=4, num_experts_per_tok=2)
    mixed = dict(sliding_window=SLIDING_WINDOW, layer_types=_mixed_layer_types(n_layers))
    simple = {
        "olmo": (transformers.OlmoConfig, dict(clip_qkv=3.0)),  # clipping that bites at this init scale
        "olmo2": (transformers.Olmo2Config, {}),
        "olmo3": (transformers.Olmo3Config, mixed),
        "glm": (transformers.GlmConfig, dict(head_dim=head_dim)),  # partial rotary 0.5
        "glm4": (transformers.Glm4Config, dict(head_dim=head_dim)),
        "helium": (transformers.HeliumConfig, dict(head_dim=head_dim)),
        "arcee": (transformers.ArceeConfig, {}),
        "apertus": (transformers.ApertusConfig, {}),
        "seed_oss": (transformers.SeedOssConfig, dict(head_dim=head_dim)),
        "ernie4_5": (transformers.Ernie4_5Config, dict(head_dim=head_dim)),
        "nemotron": (transformers.NemotronConfig, dict(head_dim=head_dim)),  # partial rotary 0.5
        "internlm3": (transformers.InternLM3Config, dict(head_dim=head_dim)),
        "hunyuan_v1_dense": (transformers.HunYuanDenseV1Config, dict(head_dim=head_dim)),
        "phi": (transformers.PhiConfig, dict(qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0)),
        "persimmon": (transformers.PersimmonConfig, {}),
        "stablelm": (transformers.StableLmConfig, dict(use_parallel_residual=True, qk_layernorm=True)),
        "gemma": (transformers.GemmaConfig, dict(head_dim=head_dim, tie_word_embeddings=True)),
        # Gemma 3: local/global rotary bases, query_pre_attn_scalar != head_dim, both soft-caps bite.
        "gemma3_text": (transformers.Gemma3TextConfig, dict(
            head_dim=head_dim, query_pre_attn_scalar=2 * head_dim, rope_local_base_freq=100.0,
            attn_logit_softcapping=10.0, final_logit_softcapping=1.0, tie_word_embeddings=True, **mixed)),
        "vaultgemma": (transformers.VaultGemmaConfig, dict(
            head_dim=head_dim, query_pre_attn_scalar=head_dim, attn_logit_softcapping=10.0,
            final_logit_softcapping=1.0, tie_word_embeddings=True, **mixed)),
        # Granite's four multipliers, all away from 1.
        "granite": (transformers.GraniteConfig, dict(
            embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0)),
        "cohere": (transformers.CohereConfig, dict(logit_scale=0.5, use_qk_norm=True, tie_word_embeddings=True)),
        "cohere2": (transformers.Cohere2Config, dict(logit_scale=0.5, tie_word_embeddings=True, **mixed)),
        # SmolLM3: every second layer without rotary.
        "smollm3": (transformers.SmolLM3Config, dict(no_rope_layer_interval=2)),
        "exaone4": (transformers.Exaone4Config, dict(head_dim=head_dim, **mixed)),
        "ministral": (transformers.MinistralConfig, dict(head_dim=head_dim, **mixed)),
        "starcoder2": (transformers.Starcoder2Config, dict(sliding_window=SLIDING_WINDOW, residual_dropout=0.0,
                                                           embedding_dropout=0.0, attention_dropout=0.0)),
        "gpt_neox": (transformers.GPTNeoXConfig, dict(rotary_pct=0.25, use_parallel_residual=True,
                                                      hidden_dropout=0.0, attention_dropout=0.0)),
        "gpt_bigcode": (transformers.GPTBigCodeConfig, dict(
            n_embd=kw["hidden_size"], n_layer=n_layers, n_head=kw["num_attention_heads"], n_positions=1024,
            multi_query=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        # Mixture of experts: 4 experts, 2 per token; routing must run where the layer runs.
        "mixtral": (transformers.MixtralConfig, dict(sliding_window=SLIDING_WINDOW, **experts)),
        "phimoe": (transformers.PhimoeConfig, dict(sliding_window=SLIDING_WINDOW, **experts)),
        "qwen2_moe": (transformers.Qwen2MoeConfig, dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=n_layers // 2)),
        "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
            head_dim=head_dim, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            use_sliding_window=True, sliding_window=SLIDING_WINDOW)),
        "olmoe": (transformers.OlmoeConfig, dict(num_experts=4, num_experts_per_tok=2)),
        "granitemoe": (transformers.GraniteMoeConfig, dict(
            embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0,
            **experts)),
        # GPT-OSS: attention sinks, alternating windows, experts.
        "gpt_oss": (transformers.GptOssConfig, dict(
            head_dim=head_dim, num_local_experts=4, num_experts_per_tok=2, **mixed)),
    }
    cls, extra = simple[family]
    return cls, {**kw, **extra}


NORM_NOISE = 0.1


@torch.no_grad()
def _perturb(model: torch.nn.Module, family: str, hidden_size: int, special_ids: list[int]) -> None:
    """Post-init tweaks, drawn from the same seeded RNG.

    Norm weights are initialised to exactly 1 (Gemma: 0, used as 1 + w), which
    would hide a split that drops or misapplies them; add noise so they count.
    """
    for name, param in model.named_parameters():
        if "norm" in name or ".ln_" in name:
            param.add_(torch.randn_like(param) * NORM_NOISE)
    if family in SCALED_EMBEDDING_FAMILIES:
        # Gemma multiplies embeddings by sqrt(hidden_size); with tied embeddings the
        # input token then dominates the last hidden state and greedy decoding
        # repeats it forever. Undo that factor in the weights.
        model.get_input_embeddings().weight.mul_(hidden_size**-0.5)
    out = model.get_output_embeddings().weight
    if out is not model.get_input_embeddings().weight:
        # Random models would stop at eos at random (~1/vocab per step); a zero
        # row gives special tokens logit 0, below the top logit, so greedy runs
        # its full length. (Tied models keep theirs: it is their input embedding too.)
        out[special_ids] = 0.0


def build_tiny_model(
    family: str,
    dest: Path,
    *,
    num_layers: int = 6,
    hidden_size: int = 64,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    **config_overrides,
) -> Path:
    """Build a seeded random `family` causal LM, save it with a tokenizer to `dest`, return `dest`.

    `vocab_size` defaults to the tokenizer's; a larger one is fine (ids beyond the
    tokenizer are simply never produced by it). `tokenizer_dir` reuses an
    already trained tokenizer instead of training one. `config_overrides` are
    passed to the config class and win over the defaults chosen here.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = train_tokenizer(dest)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.save_pretrained(dest)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = _family_config(family, num_layers, hidden_size, vocab_size or len(tokenizer), ids, config_overrides)

    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG alone
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb(model, family, hidden_size, tokenizer.all_special_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(dest)
    return dest
