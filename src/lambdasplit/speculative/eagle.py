"""`--speculate eagle`: a feature-level draft head on the device (after EAGLE, Li et al. 2024).

The tail already holds the last decoder layer's output (the features, before the final
norm) of every position it verifies. The head predicts the next position's features
from this position's features and the next token's embedding:

    f^_{t+1} = layer(fc([embed(x_{t+1}); f_t]))        one decoder layer with its own KV cache
    logits_{t+1} = lm_head(final_norm(f^_{t+1}))        the target's own norm and LM head

and drafts autoregressively from its own predictions. Only `fc` and the layer are
trained (zoo/draft_train.py, `lambdasplit zoo train smollm2-draft`); the embedding, norm
and LM head are the device's, so the head adds a few MB to the device, nothing to the
server, and sees nothing the device does not already hold.

Drafting is a chain (k tokens, verified by an ordinary step). EAGLE's tree of candidates
needs a STEP carrying a tree attention mask (docs/speculative.md): not in protocol v1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lambdasplit.errors import UsageError
from lambdasplit.speculative.sources import Draft, Step

BUNDLED = Path(__file__).resolve().parent.parent / "zoo" / "data" / "smollm2_draft"
WEIGHTS, CONFIG = "draft_head.safetensors", "draft_head.json"


def head_config(target_config, intermediate_size: int | None = None) -> LlamaConfig:
    """The head's one Llama layer, sized like the target's layers (hidden size, heads)."""
    d = target_config.hidden_size
    heads = getattr(target_config, "num_attention_heads", None) or 8
    kv = getattr(target_config, "num_key_value_heads", None) or heads
    return LlamaConfig(hidden_size=d, intermediate_size=intermediate_size or 2 * d, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=d // heads, num_hidden_layers=1,
                       rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-5),
                       rope_theta=float(getattr(target_config, "rope_theta", None) or 10000.0),
                       max_position_embeddings=getattr(target_config, "max_position_embeddings", 8192),
                       vocab_size=1, attn_implementation="sdpa")


def causal_mask(queries: int, past: int) -> torch.Tensor:
    """Additive [1, 1, q, past + q] mask: query i (at position past + i) sees keys 0 .. past + i."""
    return torch.full((queries, past + queries), float("-inf")).triu(past + 1)[None, None]


class EagleHead(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        config._attn_implementation = config._attn_implementation or "sdpa"  # not kept by to_dict()
        self.config = config
        d = config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, start: int = 0,
                cache: DynamicCache | None = None) -> torch.Tensor:
        """features, embeddings: [B, n, D] for positions start .. start + n - 1 -> predicted next features."""
        hidden = self.fc(torch.cat([embeddings, features], dim=-1))
        n = hidden.shape[1]
        positions = torch.arange(start, start + n).unsqueeze(0)
        out = self.layer(hidden, attention_mask=causal_mask(n, start), position_ids=positions,
                         past_key_values=cache, use_cache=cache is not None,
                         position_embeddings=self.rotary(hidden, positions))
        return out[0] if isinstance(out, tuple) else out

    def save(self, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("rotary.")},
                  str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps({"config": self.config.to_dict(), **meta}, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple["EagleHead", dict]:
        from safetensors.torch import load_file

        meta = json.loads((folder / CONFIG).read_text())
        config = LlamaConfig(**meta["config"])
        head = cls(config)
        head.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
        return head.eval(), meta


def default_head_folder() -> Path | None:
    """The bundled head, else one trained into the cache by `zoo train smollm2-draft`."""
    from lambdasplit.zoo.registry import cache_dir

    for folder in (BUNDLED, cache_dir() / "smollm2-draft"):
        if (folder / WEIGHTS).exists():
            return folder
    return None


class EagleSource:
    name = "eagle"

    def __init__(self, head: EagleHead, embed, tail):
        self.head, self.embed, self.tail = head, embed, tail
        self.cache = DynamicCache(config=head.config)
        self.fed = 0  # pairs (f_t, x_{t+1}) in the head's cache, t = 0 .. fed - 1
        self.features: dict[int, torch.Tensor] = {}  # target features of committed positions not yet fed
        self.last_prediction: torch.Tensor | None = None  # the head's output at the last fed pair

    @classmethod
    def load(cls, folder: str | None, device) -> "EagleSource":
        path = Path(folder) if folder else default_head_folder()
        if path is None or not (path / WEIGHTS).exists():
            raise UsageError("no EAGLE draft head for this model: train one with `lambdasplit zoo train smollm2-draft` "
                             "(or pass --draft-model FOLDER)" if folder is None else f"no draft head in {folder}")
        head, meta = EagleHead.load(path)
        if device is not None and meta.get("target_fingerprint") not in (None, device.checkpoint.fingerprint):
            raise UsageError(f"the draft head in {path} was trained for another model "
                             f"({meta.get('target')}); train one for this model")
        return cls(head, device.head.embed, device.tail)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        tail = self.tail
        return tail.family.logits(tail.config, tail.lm_head(tail.norm(features)))

    def _cut(self, length: int) -> None:
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many positions

    @torch.inference_mode()
    def propose(self, sequence: list[int], k: int) -> Draft:
        last = len(sequence) - 2  # the last position the target has processed (its features are known)
        if k <= 0 or last < 0 or not all(p in self.features for p in range(self.fed, last + 1)):
            return Draft()
        self._cut(self.fed)
        if self.fed <= last:  # feed the committed pairs the head has not seen yet
            feats = torch.stack([self.features.pop(p) for p in range(self.fed, last + 1)])[None]
            tokens = torch.tensor([sequence[self.fed + 1:last + 2]])
            predicted = self.head(feats, self.embed(tokens), self.fed, self.cache)[:, -1:]
            self.fed = last + 1
            self.last_prediction = predicted
        predicted = self.last_prediction
        if predicted is None:
            return Draft()
        drafts = []
        for i in range(k):
            token = int(torch.argmax(self._logits(predicted)[0, -1]))
            drafts.append(token)
            if i + 1 < k:
                predicted = self.head(predicted, self.embed(torch.tensor([[token]])), self.fed + i, self.cache)
        self._cut(self.fed)
        return Draft(drafts)

    def observe(self, sequence: list[int], step: Step) -> None:
        processed = len(sequence) - 1  # positions now committed in the target's caches
        features = step.features
        first = step.start + len(step.inputs) - features.shape[0]
        for i in range(features.shape[0]):
            position = first + i
            if position < processed:
                self.features[position] = features[i]
