"""One decode position over the merged table, as plain array code (the device's steady state).

The merged modules (merged.py) run the family's own decoder layer on the device with its
norms and projections swapped: every norm, projection, rotary and attention call is an
nn.Module call and every small op a torch dispatch. At SmolLM2's width that interpreter
overhead, not arithmetic, is most of the device's time per token (docs/benchmarks.md,
"device time"). For the generation's steady state, one new position at the end of a
causal chain, `DecodeStep` runs the same arithmetic in numpy on float32 vectors, in the
merged order:

    layer 0      x = norm(h0) (the real RMSNorm)      request [q | k | v] of x
    layer i      q, k, v = answers / rms(r)           (qwen3: q_norm, k_norm per head)
                 rotary at the position; k, v appended to the device's cache (the stack's
                 own DynamicCache, so cut-back and the module path see the same cache)
                 a = softmax(q K^T / sqrt(d)) V       grouped-query, over the cache
                 request [a ; r] -> W_o a, gate, up   h = r + W_o a; gate, up / rms(h)
                 m = silu(gate) * up
                 request [m ; h] -> W_down m and the next layer's q, k, v (undivided)
    last layer   request m -> W_down m (plain)        r = h + W_down m, returned

Server 1 is sent the whole step's requests as one PLAN before the first (SharePair.plan):
its shares are its mask stream, so it computes and streams its answers while the device
works, and the device sends it one frame per token instead of one per request.

Only what it mirrors exactly is taken: llama-shaped merged layers (llama, mistral, qwen3)
with full attention, SiLU, no biases and one position. Anything else (the prompt, several
drafted positions, sliding windows, other families) runs through the modules as before.
tests/test_shares_merged.py checks both paths give the same logits and tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from lambdasplit.shares.merged import MAX_INPUT_SHIFT

FAMILIES = ("llama", "mistral", "qwen3")


def refusal(device, stack) -> str | None:
    """Why the decode step cannot run this model (None: it can)."""
    config, family = stack.config, stack.family
    if not device.merge:
        return "the layers are not merged"
    if family.model_type not in FAMILIES:
        return f"{family.model_type} is not one of {', '.join(FAMILIES)}"
    if any(family.layer_type(config, i) != "full_attention" for i in stack.layer_indices):
        return "a layer has sliding-window attention"
    if getattr(config, "hidden_act", None) != "silu":
        return f"the activation is {getattr(config, 'hidden_act', None)}, not silu"
    for layer in stack.layers:
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None) or getattr(attn, "attention_dropout", 0.0):
            return "an attention layer has a window or dropout"
    return None


def _rms_scale(h: np.ndarray, eps: float) -> np.float32:
    """1 / rms(h), in float32 as the family's RMSNorm computes it."""
    return np.float32(1.0) / np.sqrt(np.float32(np.dot(h, h)) / np.float32(h.size) + np.float32(eps))


def _head_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """qwen3's q_norm / k_norm: RMSNorm over each head's features, x [heads, head_dim]."""
    variance = np.einsum("hd,hd->h", x, x)[:, None] / np.float32(x.shape[1])
    return weight * (x / np.sqrt(variance + np.float32(eps)))


class DecodeStep:
    """The decode step of one device stack (the merged table's indices, the layers' constants)."""

    use_plan = True

    def __init__(self, device, stack):
        config = stack.config
        self.stack, self.device = stack, device
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        index = {name: i for i, name in enumerate(device.shared_names)}
        prefix = stack.family.layers
        n = len(stack.layers)
        self.layers = []
        for i, layer in enumerate(stack.layers):
            attn = layer.self_attn
            q_norm = getattr(attn, "q_norm", None)
            k_norm = getattr(attn, "k_norm", None)
            o = f"{prefix}.{i}.self_attn.o_proj"
            down = f"{prefix}.{i}.mlp.down_proj"
            self.layers.append({
                "o": (index[o], index[f"{prefix}.{i}.mlp.gate_proj(post_attention_layernorm(o_proj + residual))"],
                      index[f"{prefix}.{i}.mlp.up_proj(post_attention_layernorm(o_proj + residual))"]),
                "down": (index[down],) if i == n - 1 else (index[down], *(
                    index[f"{prefix}.{i + 1}.self_attn.{p}(input_layernorm(layers.{i}.mlp.down_proj + residual))"]
                    for p in ("q_proj", "k_proj", "v_proj"))),
                "eps_post": float(layer.post_attention_layernorm.eps),
                "eps_in": float(layer.input_layernorm.eps),
                "scaling": float(attn.scaling),
                "q_norm": None if q_norm is None else (q_norm.weight.detach().float().numpy(), float(q_norm.variance_epsilon)),
                "k_norm": None if k_norm is None else (k_norm.weight.detach().float().numpy(), float(k_norm.variance_epsilon)),
            })
        first_norm = stack.layers[0].input_layernorm
        self.first_norm = (first_norm.real.weight.detach().float().numpy(), float(first_norm.eps))
        self.qkv0 = tuple(index[f"{prefix}.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
        self.requests = [self.qkv0]
        for entry in self.layers:
            self.requests += [entry["o"], entry["down"]]
        if device.lm_head_shared:
            self.requests.append((index[stack.family.lm_head],))
        self.q_width, self.kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        half = self.head_dim // 2
        self.swap = np.concatenate([np.arange(half, self.head_dim), np.arange(half)])

    def _qkv(self, answer: np.ndarray, offset: int, scale, entry, cos, sin_signed):
        """q, k (rotated) and v from an answer's [q | k | v] at `offset`, times 1 / rms (None: layer 0)."""
        heads = self.heads + self.kv_heads
        qkv = answer[offset:offset + self.q_width + 2 * self.kv_width]
        if scale is not None:
            qkv = qkv * scale
        qk = qkv[:self.q_width + self.kv_width].reshape(heads, self.head_dim)
        v = qkv[self.q_width + self.kv_width:].reshape(self.kv_heads, self.head_dim)
        if entry["q_norm"] is not None:
            qk = np.concatenate([_head_norm(qk[:self.heads], *entry["q_norm"]),
                                 _head_norm(qk[self.heads:], *entry["k_norm"])])
        # q cos + rotate_half(q) sin, rotate_half(q) = [-q2, q1]: the halves swapped, the sign moved onto sin
        qk = qk * cos + qk[:, self.swap] * sin_signed
        return qk[:self.heads], qk[self.heads:], v

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """hidden [1, 1, D] (the embedding) at position `start` -> the last layer's output [1, 1, D]."""
        stack, pair = self.stack, self.device.pair
        if start != stack.length:
            stack.truncate(start)
        position_ids = torch.tensor([[start]])
        cos, sin = next(iter(stack.family.position_embeddings(stack.rotary, stack.config, hidden, position_ids,
                                                              stack.layer_indices[:1]).values()))
        cos, sin = cos.reshape(-1).numpy(), sin.reshape(-1).numpy()
        half = self.head_dim // 2
        sin_signed = np.concatenate([-sin[:half], sin[half:]])
        if self.use_plan:
            pair.plan([(indices, 1) for indices in self.requests])
        try:
            with np.errstate(over="ignore"):  # silu's exp(-gate) for gate < -88: inf, and gate / inf = -0 as it should
                out = self._layers(hidden.reshape(-1).numpy().astype(np.float32, copy=False), cos, sin_signed)
        except BaseException:
            pair.settle()
            stack.cache.crop(start)  # layers that appended this position before the error
            raise
        stack.length = start + 1
        return torch.from_numpy(out).view(1, 1, -1)

    def _layers(self, r: np.ndarray, cos: np.ndarray, sin_signed: np.ndarray) -> np.ndarray:
        pair, cache = self.device.pair, self.stack.cache
        weight, eps = self.first_norm
        x = weight * (r * _rms_scale(r, eps))
        answer, offset, scale = pair.exchange(self.qkv0, x[None]), 0, None
        for i, (layer_idx, entry) in enumerate(zip(self.stack.layer_indices, self.layers)):
            q, k, v = self._qkv(answer, offset, scale, entry, cos, sin_signed)
            keys, values = cache.layers[layer_idx].update(torch.from_numpy(k[None, :, None, :]),
                                                          torch.from_numpy(v[None, :, None, :]), {})
            keys, values = keys.numpy()[0], values.numpy()[0]  # [kv_heads, T, head_dim]
            scores = np.matmul(q.reshape(self.kv_heads, self.group, self.head_dim), keys.transpose(0, 2, 1))
            scores *= np.float32(entry["scaling"])
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            a = np.matmul(scores, values).reshape(-1)  # head h reads kv head h // group, as repeat_kv
            hidden = r.size
            answer = pair.exchange(entry["o"], np.concatenate([a, r])[None], MAX_INPUT_SHIFT)
            h = r + answer[:hidden]
            post = _rms_scale(h, entry["eps_post"])
            width = (answer.size - hidden) // 2
            gate, up = answer[hidden:hidden + width] * post, answer[hidden + width:] * post
            m = gate / (np.float32(1.0) + np.exp(-gate)) * up
            if len(entry["down"]) == 1:
                return h + pair.exchange(entry["down"], m[None])
            answer = pair.exchange(entry["down"], np.concatenate([m, h])[None], MAX_INPUT_SHIFT)
            r = h + answer[:hidden]
            offset, scale = hidden, _rms_scale(r, self.layers[i + 1]["eps_in"])
        raise AssertionError("unreachable: the last layer returns")
