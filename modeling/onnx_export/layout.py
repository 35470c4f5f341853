"""The packed rows and the padded per-layer attention grid of the batch graph.

Why packed [T, d] rows for the linears rather than per-sequence compaction [b, S, d]: every GEMM
then costs exactly the accountant's charge (T = sum of the kept tokens, no padding rows), at the
price of one Gather of QKV into the attention grid (padded slots read a real row; they are masked)
and one Gather of the context back per layer; at batch size 1 both layouts coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ltp_compress.modeling.onnx_export.graph import _Graph


@dataclass
class _Layout:
    """Where the packed rows [T] live in the per-layer attention grid [b, S]."""

    lengths: str  # [b] int64 tokens per sequence
    smax: str  # [1] int64 S = max(lengths)
    pos: str  # [S] int64 0..S-1
    valid: str  # [b, S] bool, position < length
    flat_index: str  # [T] int64, packed row r -> b_r * S + pos_r
    grid_rows: str  # [b*S] int64, grid slot -> its packed row (padded slots -> row 0: finite, masked downstream)


def layout(g: _Graph, lengths: str) -> _Layout:
    """The attention grid of a layer from its tokens per sequence [b]."""
    smax = g.reduce_max(lengths, [0], keepdims=1)  # [1]
    pos = g.op("Range", [g.const(0, np.int64), g.squeeze(smax, [0]), g.const(1, np.int64)])  # [S]
    valid = g.op("Less", [g.unsqueeze(pos, [0]), g.unsqueeze(lengths, [1])])  # [b, S]
    valid_flat = g.reshape(valid, [-1])  # [b*S]
    flat_index = g.squeeze(g.op("NonZero", [valid_flat]), [0])  # [T]
    before = g.op("Sub", [g.op("CumSum", [g.op("Cast", [valid_flat], to=7), g.const(0, np.int64)]), g.const(1, np.int64)])
    grid_rows = g.op("Where", [valid_flat, before, g.const(0, np.int64)])  # [b*S]
    return _Layout(lengths=lengths, smax=smax, pos=pos, valid=valid, flat_index=flat_index, grid_rows=grid_rows)
