"""The device's own weights in lower precision than the server's: int8 weight-only (`--device-weights int8`).

Every Linear of the head's and tail's decoder layers, the embedding table and the LM head
keep int8 weights with one float32 scale per output row (symmetric: scale = max |w| / 127);
activations stay in the compute dtype. Matmuls go through torch's CPU int8-weight kernel
(`torch._weight_int8pack_mm`, the one torchao's int8 weight-only path uses), so no float
copy of a weight matrix is ever made. With tied embeddings one int8 table serves both the
embedding lookup and the LM head, as the float one did. The server's body is untouched: the
split is then no longer exact, and `bench codecs --device-weights int8` measures by how much.
"""

from __future__ import annotations

import torch
from torch import nn

from lambdasplit.errors import UsageError

DEVICE_WEIGHTS = ("float", "int8")


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class Int8Rows(nn.Module):
    """An int8 matrix with a scale per row: the shared storage of an int8 Linear and Embedding."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        qweight, scale = _quantize_rows(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output row; W is never expanded to float."""

    def __init__(self, linear: nn.Linear | None = None, rows: Int8Rows | None = None, bias=None):
        super().__init__()
        self.rows = rows if rows is not None else Int8Rows(linear.weight)
        bias = linear.bias if linear is not None else bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        dtype = flat.dtype
        # the kernel takes float32/bfloat16/float16 activations and scales of the same dtype
        out = torch._weight_int8pack_mm(flat.contiguous(), self.rows.qweight, self.rows.scale.to(dtype))
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class Int8Embedding(nn.Module):
    """Row lookup from an int8 table: only the looked-up rows are expanded."""

    def __init__(self, embedding: nn.Embedding, rows: Int8Rows | None = None):
        super().__init__()
        self.rows = rows if rows is not None else Int8Rows(embedding.weight)
        self.dtype = embedding.weight.dtype

    @property
    def weight(self) -> torch.Tensor:  # what attacks and probes read (the public table, dequantized)
        return self.rows.qweight.float() * self.rows.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.rows.qweight[ids].to(self.dtype) * self.rows.scale[ids].to(self.dtype)[..., None])


def _replace_linears(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += _replace_linears(child)
    return count


def module_bytes(*modules) -> int:
    """Bytes of every distinct parameter and buffer of the modules (shared tensors counted once)."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total


def device_modules(device) -> list:
    """The modules holding a DeviceModel's weights: embedding, head layers, tail layers, norm, LM head."""
    head, tail = device.head, device.tail
    return [head.embed, head.position_embed, *head.stack.layers, *tail.stack.layers, tail.norm, tail.lm_head]


def device_weight_bytes(device) -> int:
    return module_bytes(*device_modules(device))


def apply_device_weights(device, mode: str) -> None:
    """Turn a DeviceModel's head and tail weights to `mode` in place (float: nothing to do)."""
    if mode not in DEVICE_WEIGHTS:
        raise UsageError(f"--device-weights must be one of {', '.join(DEVICE_WEIGHTS)}, got {mode!r}")
    if mode == "float":
        return
    head, tail = device.head, device.tail
    for layer in [*head.stack.layers, *tail.stack.layers]:
        _replace_linears(layer)
    tied = isinstance(tail.lm_head, nn.Linear) and isinstance(head.embed, nn.Embedding) \
        and tail.lm_head.weight is head.embed.weight
    if isinstance(head.embed, nn.Embedding):
        head.embed = Int8Embedding(head.embed)
    if isinstance(tail.lm_head, nn.Linear):
        if tied:
            tail.lm_head = Int8Linear(rows=head.embed.rows, bias=tail.lm_head.bias)
        else:
            tail.lm_head = Int8Linear(tail.lm_head)
