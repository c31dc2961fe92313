"""The linear layers a shares server computes, in fixed point, with their overflow bounds.

Which layers: every nn.Linear (and transformers' GPT-2 Conv1D) inside the decoder layers,
in module order, plus the LM head unless the device keeps it (`lm_head=False`). Both sides
derive the same ordered list from the config alone; a request names layers by index.

Bounds, per layer (W_int = round(W 2^FRAC_W), b_int = round(b 2^FRAC_Y), L1_i = sum_j |W_int[i, j]|):

    decoding is exact     |y_int| <= L1_i (X 2^FRAC_X + 1/2) + |b_int[i]| < 2^63 for every row i,
                          which holds for inputs |x| <= X = `x_bound` (the device checks each input
                          against it before sharing, and refuses by layer name above it)
    a layer is refused    when x_bound < MIN_INPUT_BOUND (its weights are too large for the ring
                          to guarantee an input range that real activations need), or when no limb
                          of >= 8 bits keeps its float64 GEMMs exact (ring.limb_bits_for)
    rounding error        |y - W x| <= (|x|_1 2^-FRAC_W + |W|_1 2^-FRAC_X) / 2 + 2^-FRAC_Y per output

Merged layers (2 requests per decoder layer instead of 4; `merge_plan`). RMSNorm is linear up
to one scalar per position: W norm(h) = (W diag(g)) h / rms(h). So with h = r + W_o a the device
sends shares of [a ; r] once and gets back W_o a and (W_gate diag(g)) [W_o | I] [a ; r] (and the
same for up); it forms h and rms(h) itself and divides. Likewise [m ; h] (m = act(gate) * up)
gives W_down m and the NEXT layer's (W_q diag(g')) [W_down | I] [m ; h] (k, v alike). Layer 0's
q / k / v and the LM head stay plain requests (the device has the norms). Each merged layer is an
ordinary FixedLinear over the float64 product matrix M, quantized once: the bounds above hold
with M in place of W (its row L1 norms, its largest entry), over the whole concatenated input
(|a|, |r| <= X), and a merged layer that would overflow is refused by its merged name. Only
llama-shaped layers are merged (RMSNorm before attention and MLP, no biases on the merged
projections): `merge_refusal` names what stops any other model, which then runs plain.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lambdasplit.errors import UnsupportedModelError
from lambdasplit.shares.ring import FRAC_W, FRAC_X, FRAC_Y, RingConv, RingMatmul, limb_bits_for

MIN_INPUT_BOUND = 2.0 ** 12  # every shared layer must accept inputs up to |x| = 4096
_RING_MAX = 2 ** 63 - 1


class FixedPointError(UnsupportedModelError):
    """A layer the fixed-point scheme cannot keep exact (refused at load, by name)."""


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_names(model: nn.Module, family, lm_head: bool) -> list[str]:
    """The shared layers of a (meta) model in module order: decoder linears, then the LM head."""
    layers = model.get_submodule(family.layers)
    names = [f"{family.layers}.{name}" for name, module in layers.named_modules() if name and is_linear(module)]
    if lm_head:
        names.append(family.lm_head)
    return names


def in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D: weight [in, out]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """[out, in] whatever the module's layout."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@dataclass
class FixedLinear:
    """One layer in the ring: its matmul, and the input range over which decoding is exact."""

    index: int
    name: str
    in_features: int
    out_features: int
    x_bound: float
    limb_bits: int
    matmul: RingMatmul
    conv: dict | None = None  # a Conv2d's kernel, stride, padding, dilation, groups (in = channels)
    columns: tuple[int, int] | None = None  # merged: the slice of the request's input this matmul reads

    def apply(self, shares, add_bias: bool):
        return self.matmul(shares if self.columns is None else shares[:, self.columns[0]:self.columns[1]], add_bias)

    def describe(self) -> dict:
        out = {"name": self.name, "in": self.in_features, "out": self.out_features, "x_bound": self.x_bound,
               "limb_bits": self.limb_bits}
        if self.conv is not None:
            out["conv"] = self.conv
        if self.columns is not None:
            out["columns"] = list(self.columns)
        return out


def fixed_conv(index: int, name: str, conv: nn.Conv2d) -> FixedLinear:
    """A Conv2d in the ring: the bounds of the [out, in/groups * kh * kw] matrix of its kernels."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise FixedPointError(f"shares: {name}: only zero-padded convolutions with integer padding are shared")
    flat = fixed_linear(index, name, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    w_int = torch.round(conv.weight.detach().double() * 2 ** FRAC_W).to(torch.int64).numpy()
    bias = flat.matmul.bias.view(np.int64) if flat.matmul.bias is not None else None
    flat.matmul = RingConv(w_int, bias, flat.limb_bits, conv)
    flat.in_features = conv.in_channels
    flat.conv = {"kernel": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
                 "dilation": list(conv.dilation), "groups": conv.groups}
    return flat


def fixed_linear(index: int, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> FixedLinear:
    """Quantize one layer to the ring, or refuse it by name if its bounds cannot hold."""
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise FixedPointError(f"shares: layer {name} has non-finite weights")
    max_w = float(w.abs().max()) if w.numel() else 0.0
    if max_w * 2 ** FRAC_W >= 2 ** 52:
        raise FixedPointError(f"shares: layer {name} has a weight of magnitude {max_w:.3g}, beyond the fixed-point "
                              f"range (2^{52 - FRAC_W})")
    w_int = torch.round(w * 2 ** FRAC_W).to(torch.int64).numpy()
    b_int = torch.round(bias.detach().to(torch.float64) * 2 ** FRAC_Y).to(torch.int64).numpy() \
        if bias is not None else None
    out_features, in_features = w_int.shape
    rows_l1 = np.abs(w_int).sum(axis=1).astype(np.float64)
    bias_abs = np.abs(b_int).astype(np.float64) if b_int is not None else np.zeros(out_features)
    if (bias_abs >= _RING_MAX / 2).any():
        raise FixedPointError(f"shares: layer {name} has a bias beyond the fixed-point range")
    with np.errstate(divide="ignore"):
        per_row = ((_RING_MAX - bias_abs) / rows_l1 - 0.5) / 2 ** FRAC_X
    x_bound = float(per_row.min()) * (1 - 1e-9) if rows_l1.max() > 0 else math.inf
    if x_bound < MIN_INPUT_BOUND:
        raise FixedPointError(
            f"shares: layer {name} would overflow the ring: its largest row L1 norm {rows_l1.max() / 2 ** FRAC_W:.4g} "
            f"allows inputs only up to {x_bound:.4g} (need {MIN_INPUT_BOUND:g}; 2^63 / 2^{FRAC_Y} / L1)")
    limb_bits = limb_bits_for(int(np.abs(w_int).max()), in_features)
    if not limb_bits:
        raise FixedPointError(f"shares: layer {name}: no limb width >= 8 bits keeps its float64 GEMMs exact "
                              f"(max |W| {max_w:.3g}, {in_features} inputs)")
    return FixedLinear(index, name, in_features, out_features, x_bound, limb_bits, RingMatmul(w_int, b_int, limb_bits))


MERGEABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # llama's decoder layer: norm, attention, +, norm, MLP, +
_MERGED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")
_MERGED_NORMS = ("input_layernorm", "post_attention_layernorm")


def merge_refusal(skeleton: nn.Module, family) -> str | None:
    """Why this model's layers cannot be merged (None: they can). Works on a meta skeleton."""
    if family.model_type not in MERGEABLE_FAMILIES:
        return (f"{family.model_type}: only llama-shaped decoder layers ({', '.join(MERGEABLE_FAMILIES)}) are merged; "
                "its layers run plain (4 requests per layer)")
    for i, layer in enumerate(skeleton.get_submodule(family.layers)):
        prefix = f"{family.layers}.{i}"
        for name in _MERGED_NORMS:
            norm = getattr(layer, name, None)
            if norm is None or not type(norm).__name__.endswith("RMSNorm") or "Gemma" in type(norm).__name__ \
                    or getattr(norm, "weight", None) is None:
                return f"{prefix}.{name} is not a weighted RMSNorm (g * h / rms(h)): its layers run plain"
        for name in _MERGED_LINEARS:
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                return f"{prefix}.{name} does not exist (not llama-shaped): its layers run plain"
            if not isinstance(module, nn.Linear) or module.bias is not None:
                return f"{prefix}.{name} has a bias (it would be added before the division by rms): its layers run plain"
    return None


@dataclass
class MergedSpec:
    """One entry of the merged table: M = W_left diag(g) [W_right | I], or W_right alone on the input's first
    columns (then named as the plain module: o_proj / down_proj on [x ; residual])."""

    name: str
    in_width: int  # the request's input width
    out: int
    right: str  # the module whose output the device gets (o_proj, down_proj) or that is folded in
    left: str | None = None  # folded: the projection after the norm (gate / up, next layer's q / k / v)
    norm: str | None = None  # folded: the RMSNorm whose weight g sits between them


def merge_plan(skeleton: nn.Module, family, lm_head: bool) -> list[MergedSpec | str]:
    """The merged table in request order: plain module names (layer 0's q / k / v, the last down_proj,
    the LM head) and MergedSpecs. Both servers and the device derive it from the config alone."""
    stack = skeleton.get_submodule(family.layers)
    n = len(stack)
    plan: list[MergedSpec | str] = [f"{family.layers}.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    hidden = skeleton.config.hidden_size
    for i in range(n):
        p = f"{family.layers}.{i}"
        o_in = stack[i].self_attn.o_proj.in_features
        plan.append(MergedSpec(f"{p}.self_attn.o_proj", o_in + hidden, hidden, f"{p}.self_attn.o_proj"))
        for proj in ("gate_proj", "up_proj"):
            out = getattr(stack[i].mlp, proj).out_features
            plan.append(MergedSpec(f"{p}.mlp.{proj}(post_attention_layernorm(o_proj + residual))", o_in + hidden, out,
                                   f"{p}.self_attn.o_proj", f"{p}.mlp.{proj}", f"{p}.post_attention_layernorm"))
        down_in = stack[i].mlp.down_proj.in_features
        if i == n - 1:
            plan.append(f"{p}.mlp.down_proj")
            break
        q = f"{family.layers}.{i + 1}"
        plan.append(MergedSpec(f"{p}.mlp.down_proj", down_in + hidden, hidden, f"{p}.mlp.down_proj"))
        for proj in ("q_proj", "k_proj", "v_proj"):
            out = getattr(stack[i + 1].self_attn, proj).out_features
            plan.append(MergedSpec(f"{q}.self_attn.{proj}(input_layernorm(layers.{i}.mlp.down_proj + residual))",
                                   down_in + hidden, out, f"{p}.mlp.down_proj", f"{q}.self_attn.{proj}",
                                   f"{q}.input_layernorm"))
    if lm_head:
        plan.append(family.lm_head)
    return plan


def merged_matrix(skeleton: nn.Module, spec: MergedSpec) -> torch.Tensor:
    """M in float64 from the loaded modules (the product of weights is exact to ~1e-16, far below 2^-FRAC_W)."""
    right = weight_matrix(skeleton.get_submodule(spec.right)).detach().double()
    if spec.left is None:
        return right  # read on the input's first columns only
    g = skeleton.get_submodule(spec.norm).weight.detach().double()
    folded = weight_matrix(skeleton.get_submodule(spec.left)).detach().double() * g[None, :]  # W_left diag(g)
    return torch.cat([folded @ right, folded], dim=1)


def load_merged_layers(checkpoint, family, lm_head: bool = True) -> list[FixedLinear]:
    """The merged table's layers in the ring, one decoder layer's weights in memory at a time."""
    skeleton = checkpoint.skeleton(torch.float32)
    refusal = merge_refusal(skeleton, family)
    if refusal:
        raise FixedPointError(f"shares: cannot merge: {refusal}")
    aliases = {family.lm_head: family.embed} if lm_head and tied_lm_head(checkpoint, family, skeleton) else None
    plan = merge_plan(skeleton, family, lm_head)
    modules_of = [[entry] if isinstance(entry, str) else [m for m in (entry.right, entry.left, entry.norm) if m]
                  for entry in plan]
    last_use = {name: index for index, names in enumerate(modules_of) for name in names}
    layers, loaded = [], set()
    for index, (entry, names) in enumerate(zip(plan, modules_of)):
        for name in names:
            if name not in loaded:
                checkpoint.load_modules(skeleton, [name], aliases=aliases if name == family.lm_head else None)
                loaded.add(name)
        if isinstance(entry, str):
            module = skeleton.get_submodule(entry)
            layers.append(fixed_linear(index, entry, weight_matrix(module), getattr(module, "bias", None)))
        else:
            layer = fixed_linear(index, entry.name, merged_matrix(skeleton, entry), None)
            layer.in_features = entry.in_width
            if entry.left is None:
                layer.columns = (0, layer.matmul.in_features)
            layers.append(layer)
        for name in names:
            if last_use[name] == index:  # the float32 copy goes; only the ring forms are kept
                skeleton.get_submodule(name).to("meta")
                loaded.discard(name)
    return layers


def tied_lm_head(checkpoint, family, skeleton) -> bool:
    config = checkpoint.config
    return bool(getattr(config, "tie_word_embeddings", False)) or not checkpoint.has_tensor(
        f"{family.lm_head}.weight", skeleton)


def load_fixed_layers(checkpoint, family, lm_head: bool = True) -> list[FixedLinear]:
    """Read the shared layers' weights one module at a time and keep only their fixed-point form."""
    skeleton = checkpoint.skeleton(torch.float32)
    names = linear_names(skeleton, family, lm_head)
    aliases = {family.lm_head: family.embed} if lm_head and tied_lm_head(checkpoint, family, skeleton) else None
    layers = []
    for index, name in enumerate(names):
        checkpoint.load_modules(skeleton, [name], aliases=aliases if name == family.lm_head else None)
        module = skeleton.get_submodule(name)
        layers.append(fixed_linear(index, name, weight_matrix(module), getattr(module, "bias", None)))
        module.to("meta")  # the float32 copy goes; only the ring form is kept
    return layers


def table_digest(table: list[dict]) -> str:
    """What both servers and the device must agree on: names, shapes, fixed-point format."""
    text = json.dumps({"frac": [FRAC_X, FRAC_W], "layers": [[t["name"], t["in"], t["out"]] for t in table]})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unet_layer_names(unet: nn.Module) -> list[str]:
    """A diffusers U-Net's shared layers: every Conv2d and Linear, in module order."""
    return [name for name, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def load_fixed_unet(folder) -> list[FixedLinear]:
    """The U-Net's convolutions and linear projections in the ring (weights read selectively)."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    names = unet_layer_names(unet)
    state = {}
    for path in sorted((folder / "unet").glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            for name in names:
                for part in ("weight", "bias"):
                    if f"{name}.{part}" in keys:
                        state[f"{name}.{part}"] = f.get_tensor(f"{name}.{part}").float()
    layers = []
    for index, name in enumerate(names):
        meta = unet.get_submodule(name)
        if f"{name}.weight" not in state:
            raise UnsupportedModelError(f"{folder}/unet: no safetensors weight for {name}")
        module = meta.to_empty(device="cpu")
        module.weight.data = state[f"{name}.weight"]
        if module.bias is not None:
            module.bias.data = state[f"{name}.bias"]
        if isinstance(module, nn.Conv2d):
            layers.append(fixed_conv(index, name, module))
        else:
            layers.append(fixed_linear(index, name, module.weight, module.bias))
    return layers
