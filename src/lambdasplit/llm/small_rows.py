"""The LM head over 2 or 3 rows, computed as 4.

On this project's CPU build (torch 2.13.0+cpu, MKL, one thread) SmolLM2's 49152 x 576 LM head costs
11.1 ms for 1 row, 24.8 for 2, 34.1 for 3 and 16.4 for 4 (`python scripts/small_rows_timing.py`,
results/small-rows/): 2-3 rows are dearer than 4. Speculative verify steps of 2-3 positions (k = 1-2
drafts, what `--draft-tokens auto` mostly picks) run the tail's LM head over exactly that many rows.
Padding them to 4 with zeros and dropping the extra outputs costs a 4-row matmul (16.9 and 16.6
ms); each kept row is the same dot products, summed by another kernel (differences ~1e-6 relative,
as between any two row counts). The decoder layers' small matmuls are not padded: there 2 rows
padded to 4 cost more (0.055 -> 0.078 ms for 576 x 576), 3 rows the same.
"""

from __future__ import annotations

import torch
from torch import nn

SLOW_ROWS = (2, 3)
PADDED_ROWS = 4


class PaddedLinear(nn.Linear):
    """nn.Linear that computes 2 or 3 rows as 4 (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() > 1 and x.shape[-1] else 1
        if rows not in SLOW_ROWS:
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros(PADDED_ROWS - rows, flat.shape[1])])
        out = nn.functional.linear(padded, self.weight, self.bias)[:rows]
        return out.reshape(*x.shape[:-1], out.shape[-1])


def pad_small_rows(module: nn.Module) -> nn.Module:
    """Make every plain nn.Linear inside `module` a PaddedLinear (same parameters, in place)."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = PaddedLinear
    return module
