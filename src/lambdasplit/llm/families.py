"""Family adapters: the arithmetic each transformers family puts around its layer stack.

A split is exact only if head, body and tail together do exactly what the family's own
`forward` does. Each adapter states, explicitly, the module paths, the embedding
(scaling, absolute positions), which attention mask each layer receives, how a layer is
called, and what happens after the final norm (soft-capping). It reuses the family's
own modules; it never re-implements a layer.

Families not listed here are refused at load time: we have not checked that their
arithmetic is reproduced, so we will not run them with possibly wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lambdasplit.errors import UnsupportedModelError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class Family:
    """Module paths and per-family arithmetic of one decoder-only family."""

    model_type: str
    embed: str  # token embedding module
    layers: str  # ModuleList of decoder layers
    norm: str  # final norm
    lm_head: str = "lm_head"
    rotary: str | None = None  # rotary embedding module (absent for absolute positions)
    position_embed: str | None = None  # absolute position embedding (GPT-2)
    mask_rule: str = "full"  # "full", "config_sliding_window" or "layer_types"
    logit_softcap_attr: str | None = None  # config attribute of final logit soft-capping
    layer_call: str = "rotary"  # "rotary" (llama-like) or "gpt2"

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

    def call_layer(self, layer, hidden, *, mask, position_embeddings, position_ids, cache):
        if self.layer_call == "gpt2":
            return layer(hidden, cache, mask, use_cache=True, position_ids=position_ids)
        return layer(
            hidden, attention_mask=mask, position_embeddings=position_embeddings,
            position_ids=position_ids, past_key_values=cache, use_cache=True,
        )

    def logits(self, config, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(config, self.logit_softcap_attr, None) if self.logit_softcap_attr else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


_LLAMA_LIKE = dict(embed="model.embed_tokens", layers="model.layers", norm="model.norm", rotary="model.rotary_emb")

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA_LIKE),
    "mistral": Family("mistral", mask_rule="config_sliding_window", **_LLAMA_LIKE),
    "phi3": Family("phi3", mask_rule="config_sliding_window", **_LLAMA_LIKE),
    "qwen2": Family("qwen2", mask_rule="layer_types", **_LLAMA_LIKE),
    "qwen3": Family("qwen3", mask_rule="layer_types", **_LLAMA_LIKE),
    # Gemma 2 scales the embedding inside its embedding module (a buffer we re-create on
    # load), soft-caps attention inside the layer, and soft-caps the final logits here.
    "gemma2": Family("gemma2", mask_rule="layer_types", logit_softcap_attr="final_logit_softcapping", **_LLAMA_LIKE),
    "gpt2": Family(
        "gpt2", embed="transformer.wte", position_embed="transformer.wpe", layers="transformer.h",
        norm="transformer.ln_f", layer_call="gpt2",
    ),
}

SUPPORTED_FAMILIES = tuple(FAMILIES)


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported: lambdasplit only splits families whose arithmetic it "
            f"reproduces exactly ({', '.join(SUPPORTED_FAMILIES)}); running it split could give wrong numbers"
        )
    if model_type == "gpt2" and getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError("gpt2 with cross-attention is an encoder-decoder setup, not supported")
    return FAMILIES[model_type]
