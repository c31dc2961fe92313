"""The device's decoder layers over the merged table as plain array code (a causal chain of n positions).

The merged modules (merged.py) run the family's own decoder layer on the device with its
norms and projections swapped: every norm, projection, rotary and attention call is an
nn.Module call and every small op a torch dispatch. At SmolLM2's width that interpreter
overhead, not arithmetic, is most of the device's time per token (docs/benchmarks.md,
"Secret-shared mode"). For a causal chain of n new positions (the prompt, one generated
token, a drafted block to verify) `DecodeStep` runs the same arithmetic in numpy on float32
rows, in the merged order:

    layer 0      x = norm(h0) (the real RMSNorm)      request [q | k | v] of x
    layer i      q, k, v = answers / rms(r)           (qwen3: q_norm, k_norm per head)
                 rotary at the positions; k, v appended to the device's cache (the stack's
                 own DynamicCache, so cut-back and the module path see the same cache)
                 a = softmax(q K^T / sqrt(d) + causal mask) V     grouped-query, over the cache
                 request [a ; r] -> W_o a, gate, up   h = r + W_o a; gate, up / rms(h)
                 m = silu(gate) * up
                 request [m ; h] -> W_down m and the next layer's q, k, v (undivided)
    last layer   request m -> W_down m (plain)        r = h + W_down m, returned

For one position server 1 is sent the whole step's requests as one PLAN before the first
(SharePair.plan): its shares are its mask stream, so it computes and streams its answers
while the device works, and the device sends it one frame per token instead of one per
request. (Several positions' answers could exceed what a server lets wait unread: those
requests go to server 1 one by one, as before.)

Only what it mirrors exactly is taken: llama-shaped merged layers (llama, mistral, qwen3)
with full attention, SiLU and no biases, one sequence. Anything else (tree steps, sliding
windows, other families, the plain table) runs through the modules as before.
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


def _rms_scale(h: np.ndarray, eps: float) -> np.ndarray:
    """1 / rms of each row of h [n, D] -> [n, 1], in float32 as the family's RMSNorm computes it."""
    variance = np.einsum("nd,nd->n", h, h)[:, None] / np.float32(h.shape[1])
    return np.float32(1.0) / np.sqrt(variance + np.float32(eps))


def _head_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """qwen3's q_norm / k_norm: RMSNorm over each head's features, x [n, heads, head_dim]."""
    variance = np.einsum("nhd,nhd->nh", x, x)[..., None] / np.float32(x.shape[-1])
    return weight * (x / np.sqrt(variance + np.float32(eps)))


class DecodeStep:
    """The decoder layers of one device stack as array code (the merged table's indices, the layers' constants)."""


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

    def _qkv_rows(self, answer: np.ndarray, n: int) -> np.ndarray:
        """An answer's q, k, v (each n rows, one after the other) -> [n, q | k | v]."""
        parts = np.split(answer, [n * self.q_width, n * (self.q_width + self.kv_width)])
        return np.concatenate([part.reshape(n, -1) for part in parts], axis=1)

    def _qkv(self, qkv: np.ndarray, entry, cos, sin_signed):
        """q, k (rotated) and v [n, heads, head_dim] from the rows [n, q | k | v] of an answer."""
        n = qkv.shape[0]
        qk = qkv[:, :self.q_width + self.kv_width].reshape(n, self.heads + self.kv_heads, self.head_dim)
        v = qkv[:, self.q_width + self.kv_width:].reshape(n, self.kv_heads, self.head_dim)
        if entry["q_norm"] is not None:
            qk = np.concatenate([_head_norm(qk[:, :self.heads], *entry["q_norm"]),
                                 _head_norm(qk[:, self.heads:], *entry["k_norm"])], axis=1)
        # q cos + rotate_half(q) sin, rotate_half(q) = [-q2, q1]: the halves swapped, the sign moved onto sin
        qk = qk * cos[:, None] + qk[..., self.swap] * sin_signed[:, None]
        return qk[:, :self.heads], qk[:, self.heads:], v

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """hidden [1, n, D] (the embeddings) at positions start .. start + n - 1 -> the last layer's output."""
        stack, pair = self.stack, self.device.pair
        if start != stack.length:
            stack.truncate(start)
        n = hidden.shape[1]
        position_ids = torch.arange(start, start + n).unsqueeze(0)
        cos, sin = next(iter(stack.family.position_embeddings(stack.rotary, stack.config, hidden, position_ids,
                                                              stack.layer_indices[:1]).values()))
        cos, sin = cos.reshape(n, -1).numpy(), sin.reshape(n, -1).numpy()
        half = self.head_dim // 2
        sin_signed = np.concatenate([-sin[:, :half], sin[:, half:]], axis=1)
        # positions j may attend to cached positions t <= start + j (a causal chain), as the family's mask
        future = None if n == 1 else np.arange(start + n)[None, :] > (start + np.arange(n))[:, None]
        if n == 1:  # a plan's answers wait unread at server 1: one position's fit its limit
            pair.plan([(indices, 1) for indices in self.requests])
        try:
            with np.errstate(over="ignore"):  # silu's exp(-gate) for gate < -88: inf, and gate / inf = -0 as it should
                out = self._layers(hidden[0].numpy().astype(np.float32, copy=False), cos, sin_signed, future)
        except BaseException:
            pair.settle()
            stack.cache.crop(start)  # layers that appended these positions before the error
            raise
        stack.length = start + n
        return torch.from_numpy(out)[None]

    def _layers(self, r: np.ndarray, cos: np.ndarray, sin_signed: np.ndarray, future) -> np.ndarray:
        """r [n, D], the embeddings -> the last layer's output [n, D]."""
        pair, cache = self.device.pair, self.stack.cache
        n, hidden = r.shape
        weight, eps = self.first_norm
        x = weight * (r * _rms_scale(r, eps))
        qkv = self._qkv_rows(pair.exchange(self.qkv0, x), n)
        for i, (layer_idx, entry) in enumerate(zip(self.stack.layer_indices, self.layers)):
            q, k, v = self._qkv(qkv, entry, cos, sin_signed)
            keys, values = cache.layers[layer_idx].update(torch.from_numpy(k.transpose(1, 0, 2)[None]),
                                                          torch.from_numpy(v.transpose(1, 0, 2)[None]), {})
            keys, values = keys.numpy()[0], values.numpy()[0]  # [kv_heads, T, head_dim]
            # [kv_heads, group, n, head_dim]: head h reads kv head h // group, as repeat_kv
            grouped = q.reshape(n, self.kv_heads, self.group, self.head_dim).transpose(1, 2, 0, 3)
            scores = np.matmul(grouped, keys.transpose(0, 2, 1)[:, None])
            scores *= np.float32(entry["scaling"])
            if future is not None:
                scores[..., future] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            a = np.matmul(scores, values[:, None]).transpose(2, 0, 1, 3).reshape(n, -1)
            answer = pair.exchange(entry["o"], np.concatenate([a, r], axis=1), MAX_INPUT_SHIFT)
            width = (answer.size // n - hidden) // 2
            h = r + answer[:n * hidden].reshape(n, hidden)
            post = _rms_scale(h, entry["eps_post"])
            gate = answer[n * hidden:n * (hidden + width)].reshape(n, width) * post
            up = answer[n * (hidden + width):].reshape(n, width) * post
            m = gate / (np.float32(1.0) + np.exp(-gate)) * up
            if len(entry["down"]) == 1:
                return h + pair.exchange(entry["down"], m).reshape(n, hidden)
            answer = pair.exchange(entry["down"], np.concatenate([m, h], axis=1), MAX_INPUT_SHIFT)
            r = h + answer[:n * hidden].reshape(n, hidden)
            scale = _rms_scale(r, self.layers[i + 1]["eps_in"])
            qkv = self._qkv_rows(answer[n * hidden:], n) * scale
        raise AssertionError("unreachable: the last layer returns")
