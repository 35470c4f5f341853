"""The graph's token pruning: scores from the softmax probabilities, the keep rule (threshold or
top-k) and the Gather / Compress of the kept rows, for the batch graph and the batch-of-one branch.

Pruning (not in the last layer): score [b, S] = 1/H * sum_h sum_{j real} A_h(j, i) (padded
query rows masked out), keep = score > threshold_l (initializer ``prune.threshold.<l>``) or,
mode topk, the ceil(ratio_l * n0) best (TopK, lower index first on ties, like the torch
runtime's stable argsort); position 0 always kept; padding never kept. The kept rows of the
context and of the residual x are gathered (Gather / Compress) **before** the output
projection and FFN, exactly like ``forward_packed``: a token pruned at layer l skips layer l's
output projection and FFN. The grid of the next layer comes from the new lengths.
"""

from __future__ import annotations

import numpy as np

from ltp_compress.modeling.onnx_export.graph import _Graph
from ltp_compress.modeling.onnx_export.layout import _Layout, layout


class _Pruning:
    """Emits the pruning rule `pruning` (the checkpoint's ltp.json "pruning": mode none / threshold /
    topk) into `g` for a model with `heads` heads and `num_layers` layers."""

    def __init__(self, g: _Graph, pruning: dict, heads: int, num_layers: int):
        self.g, self.pruning, self.heads, self.num_layers = g, pruning, heads, num_layers
        self.mode = pruning.get("mode", "none")

    def scores_needed(self, l: int) -> bool:
        """Whether layer l prunes (the last layer never does)."""
        return self.mode != "none" and l < self.num_layers - 1

    def threshold(self, l: int) -> str:
        """Layer l's pruning threshold as the initializer `prune.threshold.<l>`."""
        return self.g.shared(f"prune.threshold.{l}", lambda: np.asarray(self.pruning["thresholds"][l], dtype=np.float32))

    def batch(self, l: int, ctx: str, x: str, probs: str, lay: _Layout, n0: str) -> tuple[str, str, _Layout]:
        """The batch graph's layer l (`scores_needed`): ctx [b*S, d] (grid rows), x [T, d] packed, probs
        [b, H, S, S], n0 [b] the input lengths -> the kept rows of ctx and x ([T', d] each) and the next
        layer's grid."""
        g, H = self.g, self.heads
        validf = g.op("Cast", [lay.valid], to=1)  # [b, S]
        # Σ_j over present query rows as a [1, S] x [S, S] product per (example, head): one read of probs
        colsum = g.op("MatMul", [g.unsqueeze(validf, [1, 2]), probs], name=f"prune.{l}.column_sum")  # [b, H, 1, S]: padded queries score nothing
        score = g.reduce_sum(colsum, [1, 2])  # [b, S]
        score = g.op("Div", [score, g.const(float(H), np.float32)], name=f"prune.{l}.score")  # 1/H sum_h sum_j A_h(j, i)
        pos0 = g.unsqueeze(g.op("Equal", [lay.pos, g.const(0, np.int64)]), [0])  # [1, S]
        if self.mode == "threshold":
            keep = g.op("Greater", [score, self.threshold(l)])  # [b, S]
        else:
            keep = self.topk_keep(l, score, lay, pos0, n0)
        keep = g.op("And", [g.op("Or", [keep, pos0]), lay.valid])  # [b, S] position 0 kept, padding never
        keep_flat = g.reshape(keep, [-1])  # [b*S]
        kept_rows = g.squeeze(g.op("NonZero", [keep_flat]), [0])  # [T'] rows of the grid
        ctx = g.op("Gather", [ctx, kept_rows], axis=0, name=f"prune.{l}.gather_ctx")  # [T', d]
        keep_packed = g.op("Gather", [keep_flat, lay.flat_index], axis=0)  # [T] bool
        x = g.op("Compress", [x, keep_packed], axis=0, name=f"prune.{l}.gather_x")  # [T', d]
        return ctx, x, layout(g, g.reduce_sum(g.op("Cast", [keep], to=7), [1]))  # new lengths [b]

    def topk_keep(self, l: int, score: str, lay: _Layout, pos0: str, n0: str) -> str:
        """keep the ceil(ratio_l * n0) best present tokens of each row (position 0 first). [b, S] bool"""
        g = self.g
        ratio = float(self.pruning["keep_ratios"][l])
        k = g.op("Ceil", [g.op("Mul", [g.op("Cast", [n0], to=11), g.const(ratio, np.float64)])])  # [b] double
        k = g.op("Min", [g.op("Max", [g.op("Cast", [k], to=7), g.const(1, np.int64)]), lay.lengths])  # [b]
        ranked = g.op("Where", [lay.valid, score, g.const(-1.0, np.float32)])
        ranked = g.op("Where", [pos0, g.const(np.inf, np.float32), ranked])  # [b, S]
        _, order = g.op("TopK", [ranked, lay.smax], n_out=2, axis=1, largest=1, sorted=1)  # [b, S] ties: lower index first
        b = g.op("Shape", [lay.valid], start=0, end=1)
        shape = g.op("Concat", [b, lay.smax], axis=0)
        rank = g.op("ScatterElements", [g.op("ConstantOfShape", [shape], value=self.g.helper.make_tensor("z", 7, [1], [0])),
                                        order, g.op("Expand", [g.unsqueeze(lay.pos, [0]), shape])], axis=1)  # [b, S]
        return g.op("Less", [rank, g.unsqueeze(k, [1])])

    def single(self, l: int, ctx: str, x: str, probs: str) -> tuple[str, str]:
        """The batch-of-one branch's layer l: ctx, x [T, d] (the sequence's present rows), probs [1, H, T, T]
        -> the kept rows of ctx and x ([T', d] each; unchanged where the layer does not prune). Threshold
        pruning only (top-k checkpoints keep the one general graph)."""
        g, H = self.g, self.heads
        if self.mode == "threshold" and l < self.num_layers - 1:
            # Σ_j A_h(j, i) as a [1, T] x [T, T] product per head (a ones row), then Σ_h over the small [1, H, 1, T]:
            # with Compress for the kept rows below, measured faster at bs 1 than ReduceSum of the
            # whole [1, H, T, T] + NonZero + two Gathers (benchmarks/results/design_observations.md)
            ones = g.op("ConstantOfShape", [g.op("Concat", [g.const([1], np.int64), g.op("Shape", [x], start=0, end=1)], axis=0)],
                        value=g.helper.make_tensor("one", 1, [1], [1.0]))  # [1, T]
            colsum = g.op("MatMul", [ones, probs], name=f"prune.{l}.column_sum")  # [1, H, 1, T]
            score = g.reduce_sum(colsum, [0, 1, 2])  # [T] = sum_h sum_j A_h(j, i)
            score = g.op("Div", [score, g.const(float(H), np.float32)], name=f"prune.{l}.score")
            keep = g.op("Greater", [score, self.threshold(l)])  # [T]
            # position 0 always kept: one ScatterElements of True at index 0 (one node; with the fused Attention
            # op in this branch, the former Slice [1:] + Concat made ORT 1.31's planner hand the next layer's [T]
            # compare the T-1 slice's buffer, a runtime error)
            keep = g.op("ScatterElements", [keep, g.const([0], np.int64), g.const([True], np.bool_)], axis=0)  # [T]
            ctx = g.op("Compress", [ctx, keep], axis=0, name=f"prune.{l}.gather_ctx")  # [T', d]
            x = g.op("Compress", [x, keep], axis=0, name=f"prune.{l}.gather_x")  # [T', d]
        return ctx, x
