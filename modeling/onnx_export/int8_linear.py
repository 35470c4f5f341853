"""The graph's Linear layers: INT8 integer GEMMs with the checkpoint's own scales, float MatMuls for
`fp_layers`, and the activation (GELU / ReLU) after the FFN input projection.

INT8 linears (every layer in the checkpoint's ``int8_layers``) use the checkpoint's own scales::

    x_c  = Max(x, -127 * x_scale)                   # only for a checkpoint with the 'symmetric'
                                                    # activation range [-127, 127]: keeps
                                                    # QuantizeLinear from producing -128 (u8 0);
                                                    # omitted where x is a GELU/ReLU output and
                                                    # 127 * x_scale >= 0.17 (it cannot act there).
                                                    # 'full' [-128, 127] (the default since the
                                                    # option exists) is QuantizeLinear's own range
    x_u8 = QuantizeLinear(x_c, x_scale, zp=128)     # uint8 = round_half_even(x / x_scale) + 128,
                                                    # saturating at 0 (= -128) and 255 (= +127)
    int8_op "MatMulIntegerToFloat" (default; ORT contrib op, one kernel):
    y    = MatMulIntegerToFloat(x_u8, W_q^T, x_scale, w_scale, 128, 0, bias)   # [T, N] float
    int8_op "MatMulInteger" (standard ONNX; ORT does not fuse this pattern, 3 more nodes):
    acc  = MatMulInteger(x_u8, W_q^T, a_zp=128)     # int32 [T, N], W_q int8 per-channel
    y    = Cast(acc, float) * (x_scale * w_scale) + bias

then exact erf GELU where the checkpoint fused it (opset >= 20: Gelu; else the Div/Erf/Add/Mul
pattern ORT's GeluFusion turns into one kernel). This is the ``kernels/linear_int8.py`` math (u8
with zero point 128 is the symmetric int8 value + 128, as in the cpu_vnni kernel); the integer
GEMM runs in MLAS (u8 x s8, int32 accumulation) in both forms. Layers listed in ``fp_layers`` use
float MatMul with their float weights. Embeddings, LayerNorm (LayerNormalization), softmax and
GELU stay float32 (the attention matmuls: modeling/onnx_export/attention.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ltp_compress.kernels.backends import QMAX
from ltp_compress.modeling.checkpoint_format import LTP_FILE, WEIGHTS_FILE
from ltp_compress.modeling.export_format import HF_CONFIG_FILE, ExportError
from ltp_compress.modeling.onnx_export.graph import _Graph
from ltp_compress.modeling.onnx_export.weights import _Weights

# a lower bound of exact GELU (min x·Φ(x) = -0.16997 at x = -0.7518) and of ReLU
GELU_MIN_BOUND = 0.17
DEFAULT_INT8_OP = "MatMulIntegerToFloat"  # (INT8_OPS) measured faster in ORT 1.31 (noisy); MatMulInteger for other runtimes


class _Linears:
    """Emits the checkpoint's Linear layers into `g`: `int8_op` (INT8_OPS) for the INT8 ones, the
    activation `act` (the HF config's hidden_act) after each FFN input projection."""

    def __init__(self, g: _Graph, w: _Weights, int8_op: str, act: str):
        self.g, self.w, self.int8_op, self.act = g, w, int8_op, act

    def gelu(self, y: str) -> str:
        g = self.g
        if g.opset >= 20:
            return g.op("Gelu", [y], approximate="none")
        # y * (1 + erf(y / sqrt 2)) * 0.5: the node pattern ORT's GeluFusion turns into one Gelu kernel
        e = g.op("Erf", [g.op("Div", [y, g.const(math.sqrt(2.0), np.float32)])])
        return g.op("Mul", [g.op("Mul", [y, g.op("Add", [e, g.const(1.0, np.float32)])]), g.const(0.5, np.float32)])

    def activation(self, y: str) -> str:
        if self.act == "gelu":
            return self.gelu(y)
        if self.act == "relu":
            return self.g.op("Relu", [y])
        raise ExportError(f"{HF_CONFIG_FILE}: hidden_act {self.act!r} is not supported by the ONNX export (gelu, relu)")

    def linear(self, x: str, names: Sequence[str]) -> str:
        """x [T, K] -> [T, sum N] for one or more Linear layers sharing the input x (outputs
        concatenated in order). INT8 layers with one common activation scale become one GEMM."""
        g = self.g
        x_scale = self.shared_int8_scale(names)
        if x_scale is not None:
            return self.int8_gemm(x, names, x_scale)
        if len(names) > 1:  # mixed or different scales: one GEMM each
            return g.op("Concat", [self.linear(x, [n]) for n in names], axis=-1)
        (n,) = names
        if n not in self.w.fp_layers and f"{n}.weight" not in self.w.tensors:
            raise ExportError(f"{WEIGHTS_FILE}: Linear '{n}' is neither int8 (w_q) nor float (weight)")
        wt = g.shared(f"{n}.weight.T", lambda: np.ascontiguousarray(self.w.tensor(f"{n}.weight").astype(np.float32).T))  # [K, N]
        y = g.op("MatMul", [x, wt], name=f"{n}.fp_matmul")
        y = g.op("Add", [y, self.w.param(g, f"{n}.bias")]) if f"{n}.bias" in self.w.tensors else y
        if n.endswith("intermediate.dense"):
            y = self.activation(y)
        return y

    def shared_int8_scale(self, names: Sequence[str]) -> float | None:
        """The one activation scale of the Linear layers `names` if all are INT8 and share it (they can then
        share one quantised input), else None."""
        if not all(n in self.w.int8_layers for n in names):
            return None
        xs = {float(self.w.tensor(f"{n}.x_scale")) for n in names}
        return xs.pop() if len(xs) == 1 else None

    def int8_gemm(self, x: str, names: Sequence[str], x_scale: float, split_outputs: bool = False) -> str | list[str]:
        """x [T, K] float -> one integer GEMM over the concatenated weights of `names` ([T, sum N]), or
        with `split_outputs` one GEMM per layer, all reading the one quantised x (a list of [T, N_i])."""
        tag = self._gemm_tag(names)
        xq, xs_name, zp = self._quantize_input(x, names[0], tag, x_scale)
        if not split_outputs:
            return self._int8_matmul(xq, xs_name, zp, x_scale, names, tag)
        return [self._int8_matmul(xq, xs_name, zp, x_scale, [n], self._gemm_tag([n])) for n in names]

    @staticmethod
    def _gemm_tag(names: Sequence[str]) -> str:
        return names[0] if len(names) == 1 else names[0].rpartition(".")[0] + "." + "+".join(n.rpartition(".")[2] for n in names)

    def _quantize_input(self, x: str, first_name: str, tag: str, x_scale: float) -> tuple[str, str, str]:
        """x [T, K] float -> (x_u8 [T, K], the x_scale initializer, the zero point 128)."""
        g = self.g
        xs_name = g.shared(f"{tag}.x_scale", lambda: np.asarray(x_scale, dtype=np.float32))  # [] the checkpoint's scale
        zp = g.const(128, np.uint8)
        # the FFN output projection reads GELU / ReLU outputs (>= -0.17): there the clamp can never act
        ffn_out = first_name.endswith(".output.dense") and not first_name.endswith("attention.output.dense")
        bounded = ffn_out and self.act in ("gelu", "relu") and float(QMAX) * x_scale >= GELU_MIN_BOUND
        if bounded or self.w.act_qmin == -QMAX - 1:  # the range is QuantizeLinear's own [-128, 127] ('full')
            xc = x
        else:
            x_min = g.shared(f"{tag}.x_min", lambda: np.asarray(-float(QMAX) * x_scale, dtype=np.float32))
            xc = g.op("Max", [x, x_min])  # [T, K], never below -127 * x_scale
        return g.op("QuantizeLinear", [xc, xs_name, zp], name=f"{tag}.quantize"), xs_name, zp  # [T, K] uint8

    def _int8_matmul(self, xq: str, xs_name: str, zp: str, x_scale: float, names: Sequence[str], tag: str) -> str:
        """x_u8 [T, K] -> [T, sum N] float for the layers `names` (weights concatenated), activation applied."""
        g = self.g
        w_q = np.concatenate([self.w.tensor(f"{n}.w_q") for n in names], 0)  # [N, K] int8
        w_scale = np.concatenate([self.w.tensor(f"{n}.w_scale").astype(np.float32) for n in names], 0)  # [N]
        biases = [self.w.tensors.get(f"{n}.bias") for n in names]
        if w_q.dtype != np.int8:
            raise ExportError(f"{WEIGHTS_FILE}: '{names[0]}.w_q' is {w_q.dtype}, expected int8")
        first = f"{tag}.w_q.T" not in g._init_names  # False: the other `If` branch built this GEMM already
        wt = g.shared(f"{tag}.w_q.T", lambda: np.ascontiguousarray(w_q.T))  # [K, N] int8
        bias = None
        if any(b is not None for b in biases):
            bias = g.shared(f"{tag}.bias", lambda: np.concatenate([np.zeros(self.w.tensor(f"{n}.w_q").shape[0], np.float32) if b is None
                                                                   else b.astype(np.float32) for n, b in zip(names, biases)]))  # [N]
        if self.int8_op == "MatMulIntegerToFloat":
            # one ORT contrib kernel: (x_u8 - 128) @ W_q^T * x_scale * w_scale[n] + bias
            ws = g.shared(f"{tag}.w_scale", lambda: w_scale)  # [N]
            wzp = g.shared(f"{tag}.w_zero_point", lambda: np.zeros(w_q.shape[0], np.int8))  # [N] symmetric weights
            y = g.op("MatMulIntegerToFloat", [xq, wt, xs_name, ws, zp, wzp] + ([bias] if bias else []),
                     name=f"{tag}.matmul_integer", domain="com.microsoft")  # [T, N] float
        else:
            acc = g.op("MatMulInteger", [xq, wt, zp], name=f"{tag}.matmul_integer")  # [T, N] int32
            out_scale = g.shared(f"{tag}.out_scale", lambda: (np.float32(x_scale) * w_scale).astype(np.float32))  # [N]
            y = g.op("Mul", [g.op("Cast", [acc], to=1), out_scale])  # [T, N] float
            y = g.op("Add", [y, bias]) if bias else y
        fused = [n in self.w.fused_gelu for n in names]
        if any(fused):
            if len(names) > 1:
                raise ExportError(f"{LTP_FILE}: GELU fused into a shared GEMM {names}")
            y = self.gelu(y)
        elif names[0].endswith("intermediate.dense"):
            y = self.activation(y)
        # the graphs this GEMM node is in: "batch" (the general graph) and / or "batch_of_one" (the `If` branch)
        branch = "batch_of_one" if g.scope == "one/" else "batch"
        if first:
            self.w.gemms.append({"node": f"{tag}.matmul_integer", "layers": list(names), "x_scale_initializer": xs_name,
                                 "weight_initializer": wt, "fused_gelu": bool(any(fused)), "graphs": [branch]})
        else:
            rec = next(r for r in self.w.gemms if r["node"] == f"{tag}.matmul_integer")
            rec["graphs"] = sorted(set(rec["graphs"]) | {branch})
        return y
