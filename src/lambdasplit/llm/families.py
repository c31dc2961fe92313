"""Family adapters: the arithmetic each transformers family puts around its layer stack.

A split is exact only if head, body and tail together do exactly what the family's own
`forward` does. Each adapter states, explicitly, the module paths, the embedding
(scaling, multipliers, absolute positions), which attention mask and which rotary
embedding each layer receives, how a layer is called, and what happens to the logits
after the LM head (scaling, soft-capping). It reuses the family's own modules; it never
re-implements a layer: what happens inside a layer (parallel attention and MLP, partial
rotary, layers without rotary, attention sinks, soft-capped attention, mixture-of-experts
routing, residual multipliers) is the family's own code, run where the layer runs.

Families not listed here are refused at load time: we have not checked that their
arithmetic is reproduced, so we will not run them with possibly wrong numbers.
`lambdasplit check --model M --as-family F` measures whether an adapter reproduces a
model the tests never saw (see llm/check.py); when it does, the check is recorded for that
architecture (its config, whatever the weights) and `family_for` accepts it through that
adapter from then on, so serve and generate can run it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lambdasplit.errors import UnsupportedModelError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Family:
    """Module paths and per-family arithmetic of one decoder-only family."""

    model_type: str
    embed: str = "model.embed_tokens"  # token embedding module (Gemma's scales inside itself)
    layers: str = "model.layers"  # ModuleList of decoder layers
    norm: str = "model.norm"  # final norm
    lm_head: str = "lm_head"
    rotary: str | None = "model.rotary_emb"  # rotary embedding module (None: absolute positions)
    position_embed: str | None = None  # absolute position embedding (GPT-2)
    mask_rule: str = "full"  # "full", "config_sliding_window" or "layer_types"
    rotary_per_layer_type: bool = False  # rotary_emb(x, positions, layer_type): Gemma 3, OLMo 3
    embedding_multiplier_attr: str | None = None  # embeddings * config.<attr> (Granite)
    logit_scale_attr: str | None = None  # logits * config.<attr> (Cohere)
    logit_divisor_attr: str | None = None  # logits / config.<attr> (Granite)
    logit_softcap_attr: str | None = None  # tanh soft-capping of the final logits (Gemma 2/3)
    layer_call: str = "rotary"  # "rotary" (llama-like), "gpt_neox" / "gpt_bigcode" (layer_past=) or "gpt2"

    # --- which mask each layer gets, exactly as the family's forward decides ---
    def layer_type(self, config, layer_idx: int) -> str:
        if self.mask_rule == "layer_types":
            return config.layer_types[layer_idx]
        if self.mask_rule == "config_sliding_window":
            return SLIDING if getattr(config, "sliding_window", None) is not None else FULL
        return FULL

    def masks(self, config, hidden, cache, position_ids, layer_indices) -> dict[str, torch.Tensor | None]:
        """The masks the given layers need, sized against this segment's own cache."""
        masks = {}
        for kind in {self.layer_type(config, i) for i in layer_indices}:
            # Size the mask against the first layer of this kind inside the segment: layers
            # outside the segment hold no cache here.
            first = next(i for i in layer_indices if self.layer_type(config, i) == kind)
            make = create_causal_mask if kind == FULL else create_sliding_window_causal_mask
            masks[kind] = make(
                config=config, inputs_embeds=hidden, attention_mask=None,
                past_key_values=cache, position_ids=position_ids, layer_idx=first,
            )
        return masks

    def position_embeddings(self, rotary, config, hidden, position_ids, layer_indices) -> dict[str, tuple | None]:
        """(cos, sin) for each layer type among the given layers (None without rotary)."""
        kinds = {self.layer_type(config, i) for i in layer_indices}
        if rotary is None:
            return dict.fromkeys(kinds)
        if self.rotary_per_layer_type:  # local and global layers rotate with different bases
            return {kind: rotary(hidden, position_ids, kind) for kind in kinds}
        shared = rotary(hidden, position_ids)
        return dict.fromkeys(kinds, shared)

    def scale_embeddings(self, config, hidden: torch.Tensor) -> torch.Tensor:
        if self.embedding_multiplier_attr:
            hidden = hidden * getattr(config, self.embedding_multiplier_attr)
        return hidden

    def call_layer(self, layer, hidden, *, mask, position_embeddings, position_ids, cache):
        if self.layer_call == "gpt2":
            return layer(hidden, cache, mask, use_cache=True, position_ids=position_ids)
        if self.layer_call == "gpt_bigcode":
            return layer(hidden, None, layer_past=cache, attention_mask=mask, use_cache=True)
        if self.layer_call == "gpt_neox":
            return layer(
                hidden, attention_mask=mask, position_ids=position_ids, layer_past=cache, use_cache=True,
                position_embeddings=position_embeddings,
            )
        return layer(
            hidden, attention_mask=mask, position_embeddings=position_embeddings,
            position_ids=position_ids, past_key_values=cache, use_cache=True,
        )

    def logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        """What the family's *ForCausalLM does after its LM head, in the same order."""
        if self.logit_scale_attr:
            logits = logits * getattr(config, self.logit_scale_attr)
        if self.logit_divisor_attr:
            logits = logits / getattr(config, self.logit_divisor_attr)
        cap = getattr(config, self.logit_softcap_attr, None) if self.logit_softcap_attr else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


_SLIDING_IF_SET = dict(mask_rule="config_sliding_window")  # one window on every layer when config.sliding_window
_LAYER_TYPES = dict(mask_rule="layer_types")  # config.layer_types says, per layer, full or sliding
_FINAL_LAYERNORM = dict(norm="model.final_layernorm")

FAMILIES: dict[str, Family] = {family.model_type: family for family in [
    # --- Llama-shaped: llama's forward, the family's own layers ---
    Family("llama"),
    Family("olmo"),  # non-parametric LayerNorm, optional qkv clipping: inside the layer
    Family("olmo2"),  # norms after attention and MLP, q/k norms: inside the layer
    Family("glm"),  # partial rotary inside its attention
    Family("glm4"),  # extra post-sublayer norms inside the layer
    Family("helium"),
    Family("arcee"),
    Family("apertus"),
    Family("seed_oss"),
    Family("ernie4_5"),
    Family("nemotron"),  # LayerNorm1P, partial rotary
    Family("internlm3"),  # transformers runs it as LlamaForCausalLM
    Family("hunyuan_v1_dense"),  # q/k norms inside its attention
    Family("olmoe"),  # mixture of experts
    Family("phi", **_FINAL_LAYERNORM),  # partial rotary, parallel attention and MLP; LM head with bias
    Family("persimmon", **_FINAL_LAYERNORM),
    Family("stablelm"),  # partial rotary, optional parallel residual and q/k LayerNorm
    # Gemma scales the embedding inside its embedding module (a buffer we re-create on load).
    Family("gemma"),
    # Granite: embedding multiplier here; residual and attention multipliers inside the layer.
    Family("granite", embedding_multiplier_attr="embedding_multiplier", logit_divisor_attr="logits_scaling"),
    Family("granitemoe", embedding_multiplier_attr="embedding_multiplier", logit_divisor_attr="logits_scaling"),
    Family("cohere", logit_scale_attr="logit_scale"),  # parallel attention and MLP inside the layer
    # --- one sliding window on every layer when the config sets one ---
    Family("mistral", **_SLIDING_IF_SET),
    Family("phi3", **_SLIDING_IF_SET),
    Family("mixtral", **_SLIDING_IF_SET),  # mixture of experts: routing runs where the layer runs
    Family("phimoe", **_SLIDING_IF_SET),
    Family("qwen3_moe", **_SLIDING_IF_SET),
    Family("starcoder2", **_SLIDING_IF_SET),
    # --- per-layer full / sliding attention from config.layer_types ---
    Family("qwen2", **_LAYER_TYPES),
    Family("qwen3", **_LAYER_TYPES),
    Family("qwen2_moe", **_LAYER_TYPES),
    Family("ministral", **_LAYER_TYPES),
    Family("smollm3", **_LAYER_TYPES),  # layers without rotary (no_rope_layers): inside the attention
    Family("exaone4", **_LAYER_TYPES),
    Family("gpt_oss", **_LAYER_TYPES),  # attention sinks, alternating windows, mixture of experts
    Family("cohere2", logit_scale_attr="logit_scale", **_LAYER_TYPES),  # rotary only on sliding layers
    # Gemma 2 soft-caps attention inside the layer, and the final logits here.
    Family("gemma2", logit_softcap_attr="final_logit_softcapping", **_LAYER_TYPES),
    Family("vaultgemma", logit_softcap_attr="final_logit_softcapping", **_LAYER_TYPES),
    # Gemma 3 (text): local and global layers with their own rotary bases; query_pre_attn_scalar inside.
    Family("gemma3_text", logit_softcap_attr="final_logit_softcapping", rotary_per_layer_type=True, **_LAYER_TYPES),
    Family("olmo3", rotary_per_layer_type=True, **_LAYER_TYPES),
    # --- other module layouts ---
    Family("gpt_neox", embed="gpt_neox.embed_in", layers="gpt_neox.layers", norm="gpt_neox.final_layer_norm",
           rotary="gpt_neox.rotary_emb", layer_call="gpt_neox"),  # the checkpoint's `embed_out` is lm_head
    Family("gpt2", embed="transformer.wte", position_embed="transformer.wpe", layers="transformer.h",
           norm="transformer.ln_f", rotary=None, layer_call="gpt2"),
    # StarCoder 1 / SantaCoder: GPT-2's layout, multi-query attention.
    Family("gpt_bigcode", embed="transformer.wte", position_embed="transformer.wpe", layers="transformer.h",
           norm="transformer.ln_f", rotary=None, layer_call="gpt_bigcode"),
]}

SUPPORTED_FAMILIES = tuple(FAMILIES)

# Families whose layers carry state a cut-back cannot undo (recurrent or linear-attention
# layers keep one running state, not one entry per position): speculative rejections,
# replays and the no-cache baseline all need to return to an earlier position.
_RECURRENT = "its recurrent / linear-attention layers keep a running state that cannot be cut back to an earlier position"
REFUSED_FAMILIES: dict[str, str] = {
    "mamba": "Mamba is a state-space model: " + _RECURRENT,
    "mamba2": "Mamba-2 is a state-space model: " + _RECURRENT,
    "falcon_mamba": "Falcon-Mamba is a state-space model: " + _RECURRENT,
    "jamba": "Jamba is a hybrid of attention and Mamba layers: " + _RECURRENT,
    "bamba": "Bamba is a hybrid of attention and Mamba-2 layers: " + _RECURRENT,
    "zamba": "Zamba is a hybrid of attention and Mamba layers: " + _RECURRENT,
    "zamba2": "Zamba2 is a hybrid of attention and Mamba-2 layers: " + _RECURRENT,
    "falcon_h1": "Falcon-H1 runs attention and Mamba-2 heads side by side: " + _RECURRENT,
    "granitemoehybrid": "Granite 4 (hybrid) mixes attention and Mamba-2 layers: " + _RECURRENT,
    "nemotron_h": "Nemotron-H mixes attention and Mamba-2 layers: " + _RECURRENT,
    "lfm2": "LFM2 mixes attention and short-convolution layers: " + _RECURRENT,
    "lfm2_moe": "LFM2-MoE mixes attention and short-convolution layers: " + _RECURRENT,
    "qwen3_next": "Qwen3-Next mixes attention and Gated DeltaNet layers: " + _RECURRENT,
    "kimi_linear": "Kimi Linear mixes attention and linear-attention layers: " + _RECURRENT,
    "minimax": "MiniMax mixes attention and lightning (linear) attention layers: " + _RECURRENT,
    "recurrent_gemma": "RecurrentGemma mixes local attention and RG-LRU recurrent layers: " + _RECURRENT,
    "rwkv": "RWKV is a recurrent network: " + _RECURRENT,
    "xlstm": "xLSTM is a recurrent network: " + _RECURRENT,
    "gemma3": "this is Gemma 3 with its vision tower (Gemma3ForConditionalGeneration); "
              "only the text model (model_type gemma3_text, Gemma3ForCausalLM) is split",
}


def family_for(config) -> Family:
    """The adapter of this config's family, or a one-line refusal saying why not."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_FAMILIES:
        raise UnsupportedModelError(f"model family {model_type!r} is refused: {REFUSED_FAMILIES[model_type]}")
    if model_type not in FAMILIES:
        checked = checked_family(config)
        if checked is not None:
            check_config(checked, config)
            return checked
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported: lambdasplit only splits families whose arithmetic it "
            f"reproduces exactly ({', '.join(SUPPORTED_FAMILIES)}); running it split could give wrong numbers. "
            f"If its forward is one of these, `lambdasplit check --model M --as-family F` measures whether that "
            f"adapter reproduces it; once it does, serve and generate accept this model through that adapter"
        )
    check_config(FAMILIES[model_type], config)
    return FAMILIES[model_type]


# ---------------------------------------------------------------- families made usable by `check`
# Exactness is a property of the architecture (the config) and the adapter, not of the weights:
# a passing `check --as-family F` is recorded under a hash of both, so changing either (a new
# config, an edited adapter) voids the record.
_UNSTABLE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash")


def architecture_key(config, family: Family) -> str:
    described = {k: v for k, v in config.to_dict().items() if k not in _UNSTABLE_CONFIG_KEYS}
    text = json.dumps({"config": described, "adapter": asdict(family)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def checked_records_dir() -> Path:
    from lambdasplit.zoo.registry import cache_dir

    return cache_dir() / "checked"


def record_check(config, family: Family, report: dict) -> Path:
    """Remember that `check` found `family`'s adapter exact on this architecture."""
    folder = checked_records_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.model_type}-{architecture_key(config, family)}.json"
    record = {"model_type": config.model_type, "adapter": family.model_type, "model": report["model"],
              "dtype": report["dtype"], "splits": sorted({r["split"] for r in report["results"]})}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(path)
    return path


def checked_family(config) -> Family | None:
    """The adapter a recorded, still valid `check --as-family` found exact for this architecture."""
    folder = checked_records_dir()
    for path in sorted(folder.glob(f"{config.model_type}-*.json")) if folder.is_dir() else []:
        try:
            adapter = json.loads(path.read_text())["adapter"]
        except (OSError, ValueError, KeyError):
            continue
        family = FAMILIES.get(adapter)
        if family is not None and path.stem == f"{config.model_type}-{architecture_key(config, family)}":
            return family
    return None


def check_config(family: Family, config) -> None:
    """Refuse the settings of a supported family that the adapter does not reproduce."""
    name = family.model_type
    if getattr(config, "quantization_config", None):
        raise UnsupportedModelError(f"{name}: quantized checkpoints are not supported (the loader reads plain tensors)")
    if name in ("gpt2", "gpt_bigcode") and getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{name} with cross-attention is an encoder-decoder setup, not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{name} with use_bidirectional_attention is an encoder, not a causal LM")
    if family.mask_rule == "layer_types" and getattr(config, "layer_types", None) is None:
        raise UnsupportedModelError(f"{name}: the config has no layer_types, so the attention of each layer is unknown")
