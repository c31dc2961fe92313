"""How a feature map is cut among n servers.

The n servers form a grid of rows x cols blocks, as square as n allows (2 -> 2x1,
4 -> 2x2, 8 -> 4x2). A convolution's OUTPUT map is cut evenly on that grid; each server
gets the input rows and columns its output block needs (the halo), minus the zero
padding at the map's borders, which the server adds itself (so it never receives padding
as if it were data, and the received region is exactly what it learns).

A map is too small to cut when its sides do not divide by the grid, or when a block plus
its halo would be the whole map (a 3x3 convolution on a 2x2 map: every output pixel needs
every input pixel, so any server computing any of it would see everything). The driver
then refuses by name, or with small_maps="local" runs that layer on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lambdasplit.errors import LambdaSplitError


class PartitionError(LambdaSplitError):
    """A layer's map cannot be cut among the servers (the message names the layer and shape)."""


def grid(n: int) -> tuple[int, int]:
    """rows x cols = n, as square as possible, rows >= cols."""
    if n < 1:
        raise PartitionError(f"need at least one server, got {n}")
    cols = max(c for c in range(1, math.isqrt(n) + 1) if n % c == 0)
    return n // cols, cols


@dataclass(frozen=True)
class Block:
    """One server's part of a layer: its output region and the input region it receives."""

    out_rows: tuple[int, int]
    out_cols: tuple[int, int]
    in_rows: tuple[int, int]  # clipped to the map
    in_cols: tuple[int, int]
    pads: tuple[int, int, int, int]  # zero padding the server adds: top, bottom, left, right


def _even(size: int, parts: int, what: str) -> list[tuple[int, int]]:
    if size % parts:
        raise PartitionError(f"{what}: {size} does not divide into {parts} blocks")
    step = size // parts
    return [(i * step, (i + 1) * step) for i in range(parts)]


def _needed(lo: int, hi: int, size: int, kernel: int, stride: int, padding: int, dilation: int):
    """Input range [start, end) clipped to the map, and the zero rows before/after, for outputs [lo, hi)."""
    start = lo * stride - padding
    end = (hi - 1) * stride - padding + dilation * (kernel - 1) + 1
    return (max(0, start), min(size, end)), max(0, -start), max(0, end - size)


def conv_blocks(height: int, width: int, n: int, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], what: str = "conv") -> list[Block]:
    rows, cols = grid(n)
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    blocks = []
    for row_range in _even(out_h, rows, f"{what} output height"):
        for col_range in _even(out_w, cols, f"{what} output width"):
            in_rows, top, bottom = _needed(*row_range, height, kernel[0], stride[0], padding[0], dilation[0])
            in_cols, left, right = _needed(*col_range, width, kernel[1], stride[1], padding[1], dilation[1])
            if in_rows == (0, height) and in_cols == (0, width):
                raise PartitionError(f"{what}: a {kernel[0]}x{kernel[1]} block of a {height}x{width} map among {n} "
                                     "servers needs the whole map (block plus halo)")
            blocks.append(Block(row_range, col_range, in_rows, in_cols, (top, bottom, left, right)))
    return blocks


def plain_blocks(height: int, width: int, n: int, what: str = "group norm") -> list[Block]:
    """Blocks without halo (group norm): input region = output region."""
    rows, cols = grid(n)
    if n > 1 and height * width <= 1:
        raise PartitionError(f"{what}: a {height}x{width} map cannot be cut among {n} servers")
    return [Block(r, c, r, c, (0, 0, 0, 0))
            for r in _even(height, rows, f"{what} height") for c in _even(width, cols, f"{what} width")]


def query_chunks(tokens: int, n: int, what: str = "attention") -> list[tuple[int, int]]:
    """Contiguous chunks of the query rows (row-major pixels: horizontal stripes)."""
    return _even(tokens, n, f"{what} query rows")
