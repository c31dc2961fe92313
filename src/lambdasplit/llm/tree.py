"""Tree steps: n positions whose attention follows a tree of candidates, not their flattened order.

A tree step (speculative verification of a whole draft tree in one step) carries, for
each of its n positions, `parents[i]`: the index of its parent in the same step, or -1
for a child of the committed prefix (the last cached position). Parents come before
children. Position i then sits at position id `start + depth(i)` (depth 0 for a child of
the prefix) and attends to the whole cached prefix, its ancestors and itself; a
sliding-window layer also drops keys whose position id is `window` or more below its own
(the window is counted in position ids, as in a chain). A chain is `parents = [-1, 0, 1, ...]`.

After a tree step the committed tokens are one root-to-node path, which is not a prefix of
the flattened order: `compact(stack, start, keep)` keeps the previous step's entries
`keep` (a path, in order) at positions start .. start + len(keep) - 1 of every layer's cache.
The same three functions serve the device (head, tail) and the server (body, engine).
"""

from __future__ import annotations

import torch

from lambdasplit.errors import LambdaSplitError

FULL = "full_attention"


def parents_problem(parents, n: int) -> str | None:
    """Why `parents` is not a valid tree for a step of n positions, or None."""
    if len(parents) != n:
        return f"{len(parents)} parent indices for a step of {n} positions"
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            return f"position {i} has parent {parent}: a parent is -1 (the committed prefix) or an earlier position"
    return None


def keep_problem(keep, previous_parents, previous_n: int) -> str | None:
    """Why `keep` is not a root-to-node path of the previous step (None parents: a chain), or None."""
    parents = previous_parents if previous_parents is not None else list(range(-1, previous_n - 1))
    last = -1
    for node in keep:
        if not 0 <= node < previous_n:
            return f"keep index {node} is outside the previous step's {previous_n} positions"
        if parents[node] != last:
            return (f"keep index {node} does not continue the path (its parent is {parents[node]}, "
                    f"the previous kept index is {last}): keep names one path from the prefix, in order")
        last = node
    return None


def is_chain(parents) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(parents))


def depths(parents) -> list[int]:
    out: list[int] = []
    for parent in parents:
        out.append(out[parent] + 1 if parent >= 0 else 0)
    return out


def position_ids(start: int, parents) -> torch.Tensor:
    return torch.tensor([[start + d for d in depths(parents)]])


def ancestry(parents) -> torch.Tensor:
    """[n, n] bool: [i, j] is True when j is i or one of its ancestors."""
    n = len(parents)
    seen = torch.eye(n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            seen[i] |= seen[parent]
    return seen


def masks(stack, hidden: torch.Tensor, start: int, parents) -> dict[str, torch.Tensor]:
    """Per layer kind of `stack`, the attention mask of a tree step at `start` against its cache.

    Sized like the family's own masks: queries n, keys what the layer's cache will show
    (the cached prefix, or a sliding layer's visible window, then the n new positions).
    Boolean (True = attend) for sdpa, additive for eager attention.
    """
    config, family = stack.config, stack.family
    implementation = (config._attn_implementation or "eager").removeprefix("lambdasplit_packed_")
    if implementation not in ("sdpa", "eager"):
        raise LambdaSplitError(f"tree steps need sdpa or eager attention, not {implementation!r}")
    n = len(parents)
    query_positions = torch.tensor([start + d for d in depths(parents)])
    tree = ancestry(parents)
    out = {}
    for kind in {family.layer_type(config, i) for i in stack.layer_indices}:
        first = next(i for i in stack.layer_indices if family.layer_type(config, i) == kind)
        layer = stack.cache.layers[first]
        kv_length, kv_offset = layer.get_mask_sizes(n)
        cached = kv_length - n
        allowed = torch.cat([torch.ones(n, cached, dtype=torch.bool), tree], dim=1)
        if kind != FULL:
            window = getattr(layer, "sliding_window", None) or config.sliding_window
            key_positions = torch.cat([torch.arange(kv_offset, kv_offset + cached), query_positions])
            allowed &= (query_positions[:, None] - key_positions[None, :]) < window
        if implementation == "sdpa":
            out[kind] = allowed[None, None]
        else:
            additive = torch.zeros(n, kv_length, dtype=hidden.dtype)
            out[kind] = additive.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[None, None]
    return out


def compact(stack, start: int, keep) -> None:
    """Keep, of the entries from `start` on, only those at offsets `keep` (in order), in every layer."""
    index = torch.cat([torch.arange(start), start + torch.tensor(list(keep), dtype=torch.long)])
    if stack.length < start + (max(keep) + 1 if len(keep) else 0):
        raise LambdaSplitError(f"cannot keep offsets {list(keep)} from {start}: only {stack.length} positions cached")
    for layer in stack.cache.layers:
        if getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = layer.keys.shape[-2]
    stack.length = start + len(keep)
