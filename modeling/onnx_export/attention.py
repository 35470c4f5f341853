"""The graph's attention forms: the standard ONNX ``Attention`` op, the spelled-out MatMul subgraph,
and INT8 attention matmuls (MatMulInteger).

Per layer: Q/K/V (one quantisation of x when the three share their activation scale, which
calibration on one input always gives) -> gathered into the per-layer attention grid -> float
attention [b, H, S, S] with padded keys masked -> softmax -> context [b*S, d]. At opset >= 23
(the default) this is one standard ONNX ``Attention`` node per layer, which also returns the
softmax probabilities (``qk_matmul_output_mode`` 3) for the scores; its Q, K and V [b, S, d]
come from three integer GEMMs on the one quantised x, each gathered into the grid (the
batch-of-one branch and the spelled-out form use one GEMM over the concatenated Q, K, V weights
[T, 3d] instead, so an export holds the Q, K, V weights in both forms); ``attention_op="MatMul"``
(or an older opset) spells it out as head reshapes, MatMul, Mul, Add, Softmax, MatMul, as the
batch-of-one branch always does.

The attention matmuls stay float32, unless the checkpoint was quantised with
``attention_matmuls: int8`` (kernels/attention_int8.py): then Q, K, V go to their int8 grids by one
per-axis QuantizeLinear (checkpoint scales, after a Max so -128 never occurs), the probabilities
to uint8 by QuantizeLinear at 1/255, and Q·Kᵀ and P·V are MatMulInteger (exact int32) followed by
one float scale each: the same integers as the torch runtime.
"""

from __future__ import annotations

import numpy as np

from ltp_compress.kernels.backends import QMAX
from ltp_compress.modeling.checkpoint_format import LTP_FILE
from ltp_compress.modeling.export_format import ExportError
from ltp_compress.modeling.onnx_export.graph import _Graph
from ltp_compress.modeling.onnx_export.layout import _Layout
from ltp_compress.modeling.onnx_export.weights import _Weights

# how float attention is expressed in the graph batches of two or more take: the standard ONNX
# `Attention` op (opset >= 23; one ORT kernel per layer that also returns the softmax probabilities the
# token scores need, qk_matmul_output_mode 3) or the MatMul / Mul / Add / Softmax / MatMul subgraph with
# its head reshapes (any opset). Outputs are bit-identical in ORT 1.31; the fused op measured faster there
# (docs/design.md, "Design notes"). The batch-of-one branch always spells it out (the
# fused op measured slower for one sequence). INT8 attention checkpoints always use MatMulInteger.
ATTENTION_OPS = ("Attention", "MatMul")
ATTENTION_OP_MIN_OPSET = 23


def resolve_attention_op(attention_op: str | None, opset: int, *, int8_attention: bool) -> str:
    """The attention op an export uses: the one asked for, or by default `Attention` where the opset
    has it (>= 23) and `MatMul` below; a checkpoint with INT8 attention matmuls always gets
    `MatMulInteger` (the fused op is float only), so asking it for `Attention` is an error."""
    if attention_op is not None and attention_op not in ATTENTION_OPS:
        raise ExportError(f"attention_op {attention_op!r} not supported (choose from {ATTENTION_OPS})")
    if attention_op == "Attention" and opset < ATTENTION_OP_MIN_OPSET:
        raise ExportError(f"attention_op 'Attention' needs opset >= {ATTENTION_OP_MIN_OPSET} (got opset {opset}); "
                          f"use attention_op 'MatMul' for older opsets")
    if int8_attention:
        if attention_op == "Attention":
            raise ExportError(f"{LTP_FILE}: the checkpoint has INT8 attention matmuls (quantization.attention_matmuls int8); "
                              f"attention_op 'Attention' is float only (leave attention_op unset: MatMulInteger)")
        return "MatMulInteger"
    if attention_op is None:
        return "Attention" if opset >= ATTENTION_OP_MIN_OPSET else "MatMul"
    return attention_op


class _Attention:
    """Emits attention into `g` for a model of hidden size `d` with `heads` heads; `attention_op` is
    the batch graph's form (`resolve_attention_op`)."""

    def __init__(self, g: _Graph, w: _Weights, d: int, heads: int, attention_op: str):
        self.g, self.w, self.d, self.heads, self.attention_op = g, w, d, heads, attention_op
        self.neg = float(np.finfo(np.float32).min)

    def uses_fused_op(self, scales) -> bool:
        """Whether the batch graph's layer with these INT8 attention scales (None: float) is one `Attention` node."""
        return scales is None and self.attention_op == "Attention"

    def attention_scales(self, p: str) -> tuple[float, float, float] | None:
        """Layer p's INT8 attention scales (q, k, v) from the checkpoint, None for float attention."""
        key = f"{p}.attention.self.int8_matmuls"
        if f"{key}.q_scale" not in self.w.tensors:
            return None
        return tuple(float(self.w.tensor(f"{key}.{n}_scale")) for n in "qkv")

    def quantize_qkv(self, qkv: str, p: str, scales: tuple[float, float, float], axis: int, rank: int) -> str:
        """Float Q, K, V stacked along `axis` of a rank-`rank` tensor -> int8 on each one's grid,
        clamp(round(x / s), -127, 127) (kernels/attention_int8.py): one per-axis QuantizeLinear,
        after a Max so its int8 saturation (-128) never acts."""
        g, key = self.g, f"{p}.attention.self.int8_matmuls"
        shape = [3] + [1] * (rank - 1 - axis)
        mins = g.shared(f"{key}.qkv_min.r{rank}", lambda: np.asarray([-float(QMAX) * v for v in scales], np.float32).reshape(shape))
        xs = g.shared(f"{key}.qkv_scale", lambda: np.asarray(scales, np.float32))  # [3]
        zp = g.shared(f"{key}.qkv_zero_point", lambda: np.zeros(3, np.int8))  # [3]
        return g.op("QuantizeLinear", [g.op("Max", [qkv, mins]), xs, zp], axis=axis, name=f"{key}.quantize_qkv")

    def attention_scores(self, q: str, kt: str, p: str, scales) -> str:
        """[.., S, dh] x [.., dh, S] -> scaled Q·Kᵀ [.., S, S]: float MatMul times 1/√dh, or for INT8
        attention an int8 x int8 MatMulInteger (exact int32) times q_scale·k_scale/√dh (one factor, as
        the torch runtime multiplies). (Folding 1/√dh into the query projection instead was measured:
        no faster, and it moves scores by an ulp: benchmarks/results/design_observations.md.)"""
        g = self.g
        dh = self.d // self.heads
        if scales is None:
            return g.op("Mul", [g.op("MatMul", [q, kt]), g.const(dh ** -0.5, np.float32)])
        key = f"{p}.attention.self.int8_matmuls"
        node = f"{key}.scores_matmul_integer"
        self._record_attention(node)
        return g.op("Mul", [g.op("Cast", [g.op("MatMulInteger", [q, kt], name=node)], to=1),
                            g.shared(f"{key}.qk_scale", lambda: np.asarray(scales[0] * scales[1] * dh ** -0.5, np.float32))])

    def attention_context(self, probs: str, v: str, p: str, scales) -> str:
        """P·V [.., S, S] x [.., S, dh]: float MatMul, or for INT8 attention the probabilities as
        uint8 round(p / (1/255)) x int8 V (MatMulInteger, exact int32) times v_scale / 255."""
        g = self.g
        if scales is None:
            return g.op("MatMul", [probs, v])
        from ltp_compress.kernels.attention_int8 import PROB_QMAX

        key = f"{p}.attention.self.int8_matmuls"
        p8 = g.op("QuantizeLinear", [probs, g.shared("attention.prob_scale", lambda: np.asarray(1.0 / PROB_QMAX, np.float32)),
                                     g.const(0, np.uint8)])  # [.., S, S] uint8
        node = f"{key}.context_matmul_integer"
        acc = g.op("MatMulInteger", [p8, v], name=node)  # [.., S, dh] int32
        self._record_attention(node)
        return g.op("Mul", [g.op("Cast", [acc], to=1), g.shared(f"{key}.pv_scale", lambda: np.asarray(scales[2] / PROB_QMAX, np.float32))])

    def fused_attention(self, q: str, k: str, v: str, mask: str | None, p: str, probs_needed: bool) -> tuple[str, str | None]:
        """q, k, v [b, S, d] (heads side by side), mask None or additive float [b, 1, S, S] -> context
        [b, S, d] and, if asked, the softmax probabilities [b, H, S, S] (qk_matmul_output_mode 3: after
        the mask). One standard ONNX `Attention` node (opset 23): softmax(Q·Kᵀ · 1/√dh + mask)·V per
        head, the same math as `attention_scores` + mask + Softmax + `attention_context`."""
        g, H, dh = self.g, self.heads, self.d // self.heads
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        attrs = dict(q_num_heads=H, kv_num_heads=H, scale=float(np.float32(dh ** -0.5)))
        if not probs_needed:
            return g.op("Attention", inputs, name=f"{p}.attention.self.attention", **attrs), None
        # outputs: context, present key / value (not computed), probabilities
        ctx, _, _, probs = g.op("Attention", inputs, n_out=4, unused=(1, 2), name=f"{p}.attention.self.attention",
                                qk_matmul_output_mode=3, **attrs)
        return ctx, probs

    def _record_attention(self, node: str) -> None:
        if node not in self.w.attention_gemms:  # both `If` branches name it the same
            self.w.attention_gemms.append(node)

    def batch_attention(self, l: int, p: str, lay: _Layout, b: str, grid: str | None, parts: list[str] | None, scales,
                        probs_needed: bool) -> tuple[str, str | None]:
        """The batch graph's attention of layer l (`p` its prefix; `b` [1] the batch size): Q, K, V as
        `grid` [b*S, 3d] (the one QKV GEMM's rows gathered into the grid) or as `parts` [Q, K, V] ([T, d]
        each, from three GEMMs: the fused op only) -> context [b*S, d] and the softmax probabilities
        [b, H, S, S] (None where the fused op was not asked for them: `probs_needed`)."""
        g, d, H = self.g, self.d, self.heads
        dh = d // H
        key_bias = g.op("Where", [lay.valid, g.const(0.0, np.float32), g.const(self.neg, np.float32)])  # [b, S]
        key_bias = g.unsqueeze(key_bias, [1, 2])  # [b, 1, 1, S] padded keys out
        if self.uses_fused_op(scales):
            if parts is not None:  # Q, K, V from their own GEMMs (one quantised input), each gathered into the grid
                shape = g.op("Concat", [b, lay.smax, g.const([d], np.int64)], axis=0)
                q, k, v = (g.reshape(g.op("Gather", [t, lay.grid_rows], axis=0, name=f"layer{l}.to_grid.{n}"), shape)
                           for t, n in zip(parts, "qkv"))  # [b, S, d] each
            else:
                grid = g.reshape(grid, g.op("Concat", [b, lay.smax, g.const([3 * d], np.int64)], axis=0))  # [b, S, 3d]
                q, k, v = g.op("Split", [grid, g.const([d, d, d], np.int64)], n_out=3, axis=-1)  # [b, S, d] each
            # the op wants the mask's query axis spelled out: [b, 1, S, S] (one Expand of the key bias)
            mask = g.op("Expand", [key_bias, g.op("Concat", [b, g.const([1], np.int64), lay.smax, lay.smax], axis=0)])
            ctx, probs = self.fused_attention(q, k, v, mask, p, probs_needed)  # [b, S, d], [b, H, S, S] | None
        else:
            grid = g.reshape(grid, g.op("Concat", [b, lay.smax, g.const([3, H, dh], np.int64)], axis=0))  # [b, S, 3, H, dh]
            if scales is not None:  # INT8 attention: Q, K, V to their int8 grids before the head shuffles
                grid = self.quantize_qkv(grid, p, scales, axis=2, rank=5)  # [b, S, 3, H, dh] int8
            q = g.op("Transpose", [g.op("Gather", [grid, g.const(0, np.int64)], axis=2)], perm=[0, 2, 1, 3])  # [b, H, S, dh]
            kt = g.op("Transpose", [g.op("Gather", [grid, g.const(1, np.int64)], axis=2)], perm=[0, 2, 3, 1])  # [b, H, dh, S]
            v = g.op("Transpose", [g.op("Gather", [grid, g.const(2, np.int64)], axis=2)], perm=[0, 2, 1, 3])  # [b, H, S, dh]
            att = self.attention_scores(q, kt, p, scales)  # [b, H, S, S]
            att = g.op("Add", [att, key_bias])  # [b, H, S, S] (a broadcast Add: cheaper than Where)
            probs = g.op("Softmax", [att], axis=-1)  # [b, H, S, S]
            ctx = g.op("Transpose", [self.attention_context(probs, v, p, scales)], perm=[0, 2, 1, 3])  # [b, S, H, dh]
        return g.reshape(ctx, [-1, d]), probs  # [b*S, d]
