"""ONNX export of a deployable checkpoint: token pruning and static INT8 inside one graph.

`export_onnx(checkpoint_dir, out_dir)` turns a deployable checkpoint (modeling/deploy.py) into a
folder that plain ``onnxruntime`` runs without ltp_compress installed::

    model.onnx        the graph below (weights as initializers)
    ltp_onnx.json     model_type, id2label, max_seq_length, input/output names, pruning rule,
                      which int8 GEMM node uses which checkpoint layers and scales (typed:
                      modeling/export_format.py ExportInfo, its one reader and writer)
    config.json       the Hugging Face config (copied from the checkpoint)
    tokenizer files   copied from the checkpoint (tokenizer.json is enough for `tokenizers`)
    manifest.json     {"format": "ltp-compress-onnx", "files": {name: {size, sha256}},
                       "parity": the export-time check against the torch runtime}

Graph (opset >= 17; shapes: b batch, s input length, T tokens still present in the batch, S the
longest surviving sequence at the current layer, d hidden, H heads, dh = d / H):

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [b, s] (dynamic axes);
  outputs ``logits`` float [b, num_labels] and ``kept_tokens`` int64 [b, L] (tokens entering
  each layer; the same as ``DeployedModel.last_kept_tokens``).
* Embeddings on the padded [b, s] input (BERT: positions 0..s-1; RoBERTa: positions from
  input_ids and padding_idx; a single token type ignores ``token_type_ids``), LayerNorm, then the
  real tokens are **packed** into x [T, d] (row-major by sequence, then position; right padding
  assumed like the torch runtime). Every Linear runs on the packed rows only: padding and pruned
  tokens never enter a GEMM.
* Per layer: Q/K/V (one quantisation of x when the three share their activation scale, which
  calibration on one input always gives) -> gathered into the per-layer attention grid -> float
  attention [b, H, S, S] with padded keys masked -> softmax -> context [b*S, d]. At opset >= 23
  (the default) this is one standard ONNX ``Attention`` node per layer, which also returns the
  softmax probabilities (``qk_matmul_output_mode`` 3) for the scores; its Q, K and V [b, S, d]
  come from three integer GEMMs on the one quantised x, each gathered into the grid (the
  batch-of-one branch and the spelled-out form use one GEMM over the concatenated Q, K, V weights
  [T, 3d] instead, so an export holds the Q, K, V weights in both forms); ``attention_op="MatMul"``
  (or an older opset) spells it out as head reshapes, MatMul, Mul, Add, Softmax, MatMul, as the
  batch-of-one branch always does.
  Pruning (not in the last layer): score [b, S] = 1/H * sum_h sum_{j real} A_h(j, i) (padded
  query rows masked out), keep = score > threshold_l (initializer ``prune.threshold.<l>``) or,
  mode topk, the ceil(ratio_l * n0) best (TopK, lower index first on ties, like the torch
  runtime's stable argsort); position 0 always kept; padding never kept. The kept rows of the
  context and of the residual x are gathered (Gather / Compress) **before** the output
  projection and FFN, exactly like ``forward_packed``: a token pruned at layer l skips layer l's
  output projection and FFN. The grid of the next layer comes from the new lengths.
* The classifier reads each sequence's first packed row (CumSum of the lengths).
* Batch of one (threshold or no pruning): an ``If`` on the batch size runs a second branch with the
  same math and the same initializers but none of the padding machinery (no grid, masks or index
  maps: the sequence's present rows are the attention grid; position 0 is kept by a Concat, pruned
  rows leave by one Gather): about 40 instead of about 65 nodes per layer, and at ~25 tokens per-node
  overhead, not arithmetic, is most of a batch of one's time (docs/design.md, "Design notes").
  Top-k checkpoints keep the one general graph.

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
GELU stay float32; so do the attention matmuls, unless the checkpoint was quantised with
``attention_matmuls: int8`` (kernels/attention_int8.py): then Q, K, V go to their int8 grids by one
per-axis QuantizeLinear (checkpoint scales, after a Max so -128 never occurs), the probabilities
to uint8 by QuantizeLinear at 1/255, and Q·Kᵀ and P·V are MatMulInteger (exact int32) followed by
one float scale each: the same integers as the torch runtime.

Why packed [T, d] rows for the linears rather than per-sequence compaction [b, S, d]: every GEMM
then costs exactly the accountant's charge (T = sum of the kept tokens, no padding rows), at the
price of one Gather of QKV into the attention grid (padded slots read a real row; they are masked)
and one Gather of the context back per layer; at batch size 1 both layouts coincide.

Note on non-VNNI x86 CPUs: ORT's u8 x s8 kernels there use vpmaddubsw (int16 pair sums that
can saturate with 8-bit weights). A checkpoint quantised with 7-bit weights (``weight_qmax``
63, backend cpu_avx2) is exact everywhere; ``weight_qmax`` is recorded in ltp_onnx.json.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ltp_compress.fileio import atomic_folder
from ltp_compress.kernels.backends import QMAX
from ltp_compress.manifest import MANIFEST_FILE, write_manifest
from ltp_compress.modeling.checkpoint_format import (LTP_FILE, WEIGHTS_FILE, CheckpointInfo, activation_scales, parse_checkpoint_info,
                                                     verify_checkpoint)
from ltp_compress.modeling.export_format import (  # noqa: F401 (the export format's names, re-exported)
    EXPORT_FORMAT, EXPORT_FORMAT_VERSION, EXPORT_REQUIRED_FILES, HF_CONFIG_FILE, INPUT_NAMES, INT8_OPS, INTEGER_GEMM_OPS, ONNX_CONFIG_FILE,
    ONNX_FILE, OUTPUT_NAMES, RECOMMENDED_SESSION_OPTIONS, TOKENIZER_FILE, ExportError, ExportInfo, ExportQuantization, ExportSource,
    session_options, verify_export, write_export_info,
)
from ltp_compress.json_model import load_json

# checkpoint files that are not copied into the export (everything else is: config + tokenizer)
_NOT_COPIED = (WEIGHTS_FILE, LTP_FILE, MANIFEST_FILE)

# a lower bound of exact GELU (min x·Φ(x) = -0.16997 at x = -0.7518) and of ReLU
GELU_MIN_BOUND = 0.17
#: the top-level `If` that sends a batch of one sequence to its own branch (then: batch of one, else: any batch)
BATCH_OF_ONE_IF = "batch_of_one"
DEFAULT_OPSET = 23
SUPPORTED_OPSETS = range(17, 24)
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

DEFAULT_INT8_OP = "MatMulIntegerToFloat"  # (INT8_OPS) measured faster in ORT 1.31 (noisy); MatMulInteger for other runtimes

# sentences used for the export-time parity check when no texts are given
BUILTIN_PARITY_TEXTS = (
    "a gripping, beautifully acted film that stays with you long after the credits roll .",
    "the plot is thin and the jokes fall flat .",
    "it 's not a great movie , but it is a pleasant enough way to spend an afternoon .",
    "bad .",
    "an ambitious , often funny , sometimes moving portrait of a family in trouble , told with real affection for its characters and their small victories .",
    "i did not like it at all",
    "the director keeps things moving , and the cast is clearly having fun .",
    "a mess .",
    "what a wonderful surprise !",
    "slow , dull and far too long for what it has to say .",
    "the best thing about the film is its music , which is lovely .",
    "neither the story nor the acting is good enough to recommend .",
    "it works .",
    "charming and warm , though a little predictable in its second half .",
    "the movie never finds its footing and ends up as a series of loosely connected scenes that go nowhere in particular .",
    "funny .",
)


# ----------------------------------------------------------------------------- graph builder


class _Graph:
    """Minimal ONNX graph builder: unique node output names, deduplicated scalar constants."""

    def __init__(self, opset: int):
        from onnx import helper

        self.helper = helper
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self._init_names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._n = 0
        self.scope = ""  # prefix of named outputs inside an `If` branch (names stay unique model-wide)

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self._init_names:
            raise ValueError(f"duplicate initializer {name}")
        self._init_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # (ascontiguousarray would make 0-d 1-d)
        return name

    def shared(self, name: str, make) -> str:
        """An initializer both `If` branches may ask for: created once from `make()`, then reused by name."""
        return name if name in self._init_names else self.init(name, make())

    def const(self, value, dtype) -> str:
        """A (cached) constant initializer: scalar or 1-D list."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const.{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None,
           domain: str = "", unused: Sequence[int] = (), **attrs) -> Any:
        """One node; returns its output name(s). Outputs at the indices in `unused` are left empty
        (the op does not compute them) and come back as None."""
        self._n += 1
        base = self.scope + (name or f"{op_type}_{self._n}")
        outs = ["" if i in unused else f"{base}:{i}" if n_out > 1 else base for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=f"n{self._n}.{base}", domain=domain, **attrs))
        outs = [o or None for o in outs]
        return outs if n_out > 1 else outs[0]

    # small conveniences (all shapes are noted at the call sites)
    def unsqueeze(self, x: str, axes: Sequence[int], name: str | None = None) -> str:
        return self.op("Unsqueeze", [x, self.const(list(axes), np.int64)], name=name)

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [x, self.const(list(axes), np.int64)])

    def reshape(self, x: str, shape: str | Sequence[int]) -> str:
        return self.op("Reshape", [x, shape if isinstance(shape, str) else self.const(list(shape), np.int64)])

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        return self.op("ReduceSum", [x, self.const(list(axes), np.int64)], keepdims=keepdims)

    def reduce_max(self, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        if self.opset >= 18:
            return self.op("ReduceMax", [x, self.const(list(axes), np.int64)], keepdims=keepdims)
        return self.op("ReduceMax", [x], axes=list(axes), keepdims=keepdims)


@dataclass
class _Layout:
    """Where the packed rows [T] live in the per-layer attention grid [b, S]."""

    lengths: str  # [b] int64 tokens per sequence
    smax: str  # [1] int64 S = max(lengths)
    pos: str  # [S] int64 0..S-1
    valid: str  # [b, S] bool, position < length
    flat_index: str  # [T] int64, packed row r -> b_r * S + pos_r
    grid_rows: str  # [b*S] int64, grid slot -> its packed row (padded slots -> row 0: finite, masked downstream)


@dataclass
class _Weights:
    """Checkpoint tensors (numpy) and quantisation facts."""

    tensors: dict[str, np.ndarray]
    int8_layers: set[str]
    fused_gelu: set[str]
    fp_layers: set[str]
    act_qmin: int = -QMAX  # lower bound of the quantised Linear inputs (kernels/backends.py ACTIVATION_RANGES)
    gemms: list[dict] = field(default_factory=list)  # one entry per int8 GEMM node, for ltp_onnx.json
    attention_gemms: list[str] = field(default_factory=list)  # the INT8 attention MatMulInteger nodes


class _Builder:
    """Emits the pruned INT8 encoder graph for one checkpoint (see the module docstring)."""

    def __init__(self, g: _Graph, cfg: dict, w: _Weights, pruning: dict, fuse_qkv: bool, int8_op: str, attention_op: str):
        self.g, self.cfg, self.w, self.pruning, self.fuse_qkv, self.int8_op = g, cfg, w, pruning, fuse_qkv, int8_op
        self.attention_op = attention_op
        self.model_type = cfg["model_type"]
        self.prefix = {"bert": "bert", "roberta": "roberta"}[self.model_type]
        self.d = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.num_layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.act = cfg.get("hidden_act", "gelu")
        self.neg = float(np.finfo(np.float32).min)

    # -- pieces ----------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        try:
            return self.w.tensors[name]
        except KeyError:
            raise ExportError(f"{WEIGHTS_FILE}: tensor '{name}' missing (expected for a {self.model_type} classifier)") from None

    def param(self, name: str) -> str:
        """A float tensor of the checkpoint as an initializer under its own name."""
        return self.g.shared(name, lambda: self.tensor(name).astype(np.float32))

    def threshold(self, l: int) -> str:
        """Layer l's pruning threshold as the initializer `prune.threshold.<l>`."""
        return self.g.shared(f"prune.threshold.{l}", lambda: np.asarray(self.pruning["thresholds"][l], dtype=np.float32))

    def attention_scales(self, p: str) -> tuple[float, float, float] | None:
        """Layer p's INT8 attention scales (q, k, v) from the checkpoint, None for float attention."""
        key = f"{p}.attention.self.int8_matmuls"
        if f"{key}.q_scale" not in self.w.tensors:
            return None
        return tuple(float(self.tensor(f"{key}.{n}_scale")) for n in "qkv")

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

    def layer_norm(self, x: str, name: str) -> str:
        return self.g.op("LayerNormalization", [x, self.param(f"{name}.weight"), self.param(f"{name}.bias")],
                         axis=-1, epsilon=self.eps)

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
        x_scale = self._shared_int8_scale(names)
        if x_scale is not None:
            return self._int8_gemm(x, names, x_scale)
        if len(names) > 1:  # mixed or different scales: one GEMM each
            return g.op("Concat", [self.linear(x, [n]) for n in names], axis=-1)
        (n,) = names
        if n not in self.w.fp_layers and f"{n}.weight" not in self.w.tensors:
            raise ExportError(f"{WEIGHTS_FILE}: Linear '{n}' is neither int8 (w_q) nor float (weight)")
        wt = g.shared(f"{n}.weight.T", lambda: np.ascontiguousarray(self.tensor(f"{n}.weight").astype(np.float32).T))  # [K, N]
        y = g.op("MatMul", [x, wt], name=f"{n}.fp_matmul")
        y = g.op("Add", [y, self.param(f"{n}.bias")]) if f"{n}.bias" in self.w.tensors else y
        if n.endswith("intermediate.dense"):
            y = self.activation(y)
        return y

    def _shared_int8_scale(self, names: Sequence[str]) -> float | None:
        """The one activation scale of the Linear layers `names` if all are INT8 and share it (they can then
        share one quantised input), else None."""
        if not all(n in self.w.int8_layers for n in names):
            return None
        xs = {float(self.tensor(f"{n}.x_scale")) for n in names}
        return xs.pop() if len(xs) == 1 else None

    def _int8_gemm(self, x: str, names: Sequence[str], x_scale: float, split_outputs: bool = False) -> str | list[str]:
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
        w_q = np.concatenate([self.tensor(f"{n}.w_q") for n in names], 0)  # [N, K] int8
        w_scale = np.concatenate([self.tensor(f"{n}.w_scale").astype(np.float32) for n in names], 0)  # [N]
        biases = [self.w.tensors.get(f"{n}.bias") for n in names]
        if w_q.dtype != np.int8:
            raise ExportError(f"{WEIGHTS_FILE}: '{names[0]}.w_q' is {w_q.dtype}, expected int8")
        first = f"{tag}.w_q.T" not in g._init_names  # False: the other `If` branch built this GEMM already
        wt = g.shared(f"{tag}.w_q.T", lambda: np.ascontiguousarray(w_q.T))  # [K, N] int8
        bias = None
        if any(b is not None for b in biases):
            bias = g.shared(f"{tag}.bias", lambda: np.concatenate([np.zeros(self.tensor(f"{n}.w_q").shape[0], np.float32) if b is None
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

    def layout(self, lengths: str) -> _Layout:
        """The attention grid of a layer from its tokens per sequence [b]."""
        g = self.g
        smax = self.g.reduce_max(lengths, [0], keepdims=1)  # [1]
        pos = g.op("Range", [g.const(0, np.int64), g.squeeze(smax, [0]), g.const(1, np.int64)])  # [S]
        valid = g.op("Less", [g.unsqueeze(pos, [0]), g.unsqueeze(lengths, [1])])  # [b, S]
        valid_flat = g.reshape(valid, [-1])  # [b*S]
        flat_index = g.squeeze(g.op("NonZero", [valid_flat]), [0])  # [T]
        before = g.op("Sub", [g.op("CumSum", [g.op("Cast", [valid_flat], to=7), g.const(0, np.int64)]), g.const(1, np.int64)])
        grid_rows = g.op("Where", [valid_flat, before, g.const(0, np.int64)])  # [b*S]
        return _Layout(lengths=lengths, smax=smax, pos=pos, valid=valid, flat_index=flat_index, grid_rows=grid_rows)

    # -- model ------------------------------------------------------------------------------

    def embeddings(self, ids: str, mask: str, tt: str) -> str:
        """[b, s] ids -> [b, s, d], as the HF embedding module computes it."""
        g, p = self.g, f"{self.prefix}.embeddings"
        x = g.op("Gather", [self.param(f"{p}.word_embeddings.weight"), ids])  # [b, s, d]
        if self.model_type == "roberta":
            pad = int(self.cfg.get("pad_token_id", 1))
            nonpad = g.op("Cast", [g.op("Not", [g.op("Equal", [ids, g.const(pad, np.int64)])])], to=7)  # [b, s]
            pos_ids = g.op("Add", [g.op("Mul", [g.op("CumSum", [nonpad, g.const(1, np.int64)]), nonpad]), g.const(pad, np.int64)])
        else:
            s = g.op("Gather", [g.op("Shape", [ids]), g.const(1, np.int64)])  # []
            pos_ids = g.unsqueeze(g.op("Range", [g.const(0, np.int64), s, g.const(1, np.int64)]), [0])  # [1, s]
        x = g.op("Add", [x, g.op("Gather", [self.param(f"{p}.position_embeddings.weight"), pos_ids])])
        tte = self.tensor(f"{p}.token_type_embeddings.weight")
        if int(self.cfg.get("type_vocab_size", tte.shape[0])) == 1:
            row0 = g.shared(f"{p}.token_type_embeddings.row0", lambda: tte[0].astype(np.float32))
            x = g.op("Add", [x, row0])  # types ignored
        else:
            x = g.op("Add", [x, g.op("Gather", [self.param(f"{p}.token_type_embeddings.weight"), tt])])
        return self.layer_norm(x, f"{p}.LayerNorm")

    def qkv(self, x: str, p: str) -> str:
        """x [T, d] -> Q, K, V concatenated [T, 3d] (one GEMM when they share their activation scale)."""
        names = [f"{p}.attention.self.{n}" for n in ("query", "key", "value")]
        if self.fuse_qkv:
            return self.linear(x, names)
        return self.g.op("Concat", [self.linear(x, [n]) for n in names], axis=-1)

    def qkv_parts(self, x: str, p: str) -> list[str] | None:
        """x [T, d] -> [Q, K, V], each [T, d], by three integer GEMMs on one quantised x, or None where
        Q, K, V are not all INT8 with one activation scale (or fuse_qkv is off)."""
        names = [f"{p}.attention.self.{n}" for n in ("query", "key", "value")]
        x_scale = self._shared_int8_scale(names) if self.fuse_qkv else None
        return None if x_scale is None else self._int8_gemm(x, names, x_scale, split_outputs=True)

    def encoder_layer(self, l: int, x: str, lay: _Layout, n0: str) -> tuple[str, _Layout]:
        """x [T, d] packed -> [T', d] packed (T' = tokens kept after this layer)."""
        g, d, H = self.g, self.d, self.heads
        dh = d // H
        p = f"{self.prefix}.encoder.layer.{l}"
        b = g.op("Shape", [lay.valid], start=0, end=1)  # [1]
        scales = self.attention_scales(p)
        # with the fused Attention op, Q, K, V come from three GEMMs on one quantised x, each gathered straight
        # into the grid: no Split copy of the [b, S, 3d] grid (measured faster at bs 8 / 32 on SST-2 and MRPC:
        # docs/design.md, "Design notes"); the batch-of-one branch keeps the one QKV GEMM
        parts = self.qkv_parts(x, p) if scales is None and self.attention_op == "Attention" else None
        if parts is None:
            qkv = self.qkv(x, p)  # [T, 3d]
            # packed rows -> the per-layer attention grid by one Gather (a padded slot reads row 0: its key is
            # masked below, its query row never reaches the output or the scores). It replaces ConstantOfShape
            # zeros + ScatterND, a large share of the old graph's time at bs 32 in ORT 1.31's profile (docs/design.md, "Design notes").
            grid = g.op("Gather", [qkv, lay.grid_rows], axis=0, name=f"layer{l}.to_grid")  # [b*S, 3d]
        mode = self.pruning.get("mode", "none")
        scores_needed = mode != "none" and l < self.num_layers - 1
        key_bias = g.op("Where", [lay.valid, g.const(0.0, np.float32), g.const(self.neg, np.float32)])  # [b, S]
        key_bias = g.unsqueeze(key_bias, [1, 2])  # [b, 1, 1, S] padded keys out
        if scales is None and self.attention_op == "Attention":
            if parts is not None:  # Q, K, V from their own GEMMs (one quantised input), each gathered into the grid
                shape = g.op("Concat", [b, lay.smax, g.const([d], np.int64)], axis=0)
                q, k, v = (g.reshape(g.op("Gather", [t, lay.grid_rows], axis=0, name=f"layer{l}.to_grid.{n}"), shape)
                           for t, n in zip(parts, "qkv"))  # [b, S, d] each
            else:
                grid = g.reshape(grid, g.op("Concat", [b, lay.smax, g.const([3 * d], np.int64)], axis=0))  # [b, S, 3d]
                q, k, v = g.op("Split", [grid, g.const([d, d, d], np.int64)], n_out=3, axis=-1)  # [b, S, d] each
            # the op wants the mask's query axis spelled out: [b, 1, S, S] (one Expand of the key bias)
            mask = g.op("Expand", [key_bias, g.op("Concat", [b, g.const([1], np.int64), lay.smax, lay.smax], axis=0)])
            ctx, probs = self.fused_attention(q, k, v, mask, p, scores_needed)  # [b, S, d], [b, H, S, S] | None
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
        ctx = g.reshape(ctx, [-1, d])  # [b*S, d]
        if scores_needed:
            validf = g.op("Cast", [lay.valid], to=1)  # [b, S]
            # Σ_j over present query rows as a [1, S] x [S, S] product per (example, head): one read of probs
            colsum = g.op("MatMul", [g.unsqueeze(validf, [1, 2]), probs], name=f"prune.{l}.column_sum")  # [b, H, 1, S]: padded queries score nothing
            score = g.reduce_sum(colsum, [1, 2])  # [b, S]
            score = g.op("Div", [score, g.const(float(H), np.float32)], name=f"prune.{l}.score")  # 1/H sum_h sum_j A_h(j, i)
            pos0 = g.unsqueeze(g.op("Equal", [lay.pos, g.const(0, np.int64)]), [0])  # [1, S]
            if mode == "threshold":
                keep = g.op("Greater", [score, self.threshold(l)])  # [b, S]
            else:
                keep = self.topk_keep(l, score, lay, pos0, n0)
            keep = g.op("And", [g.op("Or", [keep, pos0]), lay.valid])  # [b, S] position 0 kept, padding never
            keep_flat = g.reshape(keep, [-1])  # [b*S]
            kept_rows = g.squeeze(g.op("NonZero", [keep_flat]), [0])  # [T'] rows of the grid
            ctx = g.op("Gather", [ctx, kept_rows], axis=0, name=f"prune.{l}.gather_ctx")  # [T', d]
            keep_packed = g.op("Gather", [keep_flat, lay.flat_index], axis=0)  # [T] bool
            x = g.op("Compress", [x, keep_packed], axis=0, name=f"prune.{l}.gather_x")  # [T', d]
            lay = self.layout(g.reduce_sum(g.op("Cast", [keep], to=7), [1]))  # new lengths [b]
        else:
            ctx = g.op("Gather", [ctx, lay.flat_index], axis=0)  # [T, d] packed
        return self.post_attention(p, ctx, x), lay

    def post_attention(self, p: str, ctx: str, x: str) -> str:
        """ctx, x [T', d] (the kept rows) -> the layer's output [T', d]: output projection, residual +
        LayerNorm, FFN, residual + LayerNorm."""
        a = self.linear(ctx, [f"{p}.attention.output.dense"])  # [T', d]
        h = self.add_layer_norm(a, x, f"{p}.attention.output.LayerNorm")
        f = self.linear(h, [f"{p}.intermediate.dense"])  # [T', d_ff] (activation applied)
        o = self.linear(f, [f"{p}.output.dense"])  # [T', d]
        return self.add_layer_norm(o, h, f"{p}.output.LayerNorm")

    def add_layer_norm(self, y: str, residual: str, name: str) -> str:
        """LayerNorm(y + residual). (ORT's contrib SkipLayerNormalization on our 2-D [T, d] rows was tried:
        slower here and its outputs differed: benchmarks/results/design_observations.md.)"""
        return self.layer_norm(self.g.op("Add", [y, residual]), name)

    def single_layer(self, l: int, x: str) -> str:
        """The batch-of-one branch: x [T, d] (the sequence's present tokens, no padding anywhere) ->
        [T', d]. The same math as `encoder_layer` without the padded grid, masks or index maps."""
        g, d, H = self.g, self.d, self.heads
        dh = d // H
        p = f"{self.prefix}.encoder.layer.{l}"
        qkv = self.qkv(x, p)  # [T, 3d]
        # the spelled-out subgraph even where the batch graph uses the fused Attention op: for one sequence the
        # fused op measured slower in ORT 1.31 (benchmarks/results/design_observations.md); Q, K, V
        # stay one GEMM here (three as in the batch graph measured slower at bs 1: design_observations.md)
        heads = g.op("Transpose", [g.reshape(qkv, [-1, 3, H, dh])], perm=[1, 2, 0, 3])  # [3, H, T, dh]
        scales = self.attention_scales(p)
        if scales is not None:
            heads = self.quantize_qkv(heads, p, scales, axis=0, rank=4)  # [3, H, T, dh] int8
        q, k, v = g.op("Split", [heads, g.const([1, 1, 1], np.int64)], n_out=3, axis=0)  # [1, H, T, dh] each
        kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])  # [1, H, dh, T] (ORT folds it into the MatMul)
        att = self.attention_scores(q, kt, p, scales)  # [1, H, T, T]
        probs = g.op("Softmax", [att], axis=-1)
        ctx = g.reshape(g.op("Transpose", [self.attention_context(probs, v, p, scales)], perm=[0, 2, 1, 3]), [-1, d])  # [T, d]
        if self.pruning.get("mode", "none") == "threshold" and l < self.num_layers - 1:
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
        return self.post_attention(p, ctx, x)

    def build_single(self) -> tuple[str, str]:
        """Batch of one: returns (logits [1, num_labels], kept_tokens [1, L])."""
        g = self.g
        emb = self.embeddings("input_ids", "attention_mask", "token_type_ids")  # [1, s, d]
        mask = g.op("Not", [g.op("Equal", ["attention_mask", g.const(0, np.int64)])])  # [1, s]
        n = g.reduce_sum(g.op("Cast", [mask], to=7), [1])  # [1] tokens (right padding, like the torch runtime)
        x = g.op("Slice", [g.reshape(emb, [-1, self.d]), g.const([0], np.int64), n], name="pack_tokens")  # [T, d]
        kept = []
        for l in range(self.num_layers):
            kept.append(g.op("Shape", [x], start=0, end=1))  # [1] tokens entering layer l
            x = self.single_layer(l, x)
        kept_tokens = g.unsqueeze(g.op("Concat", kept, axis=0), [0], name="kept_tokens")  # [1, L]
        cls = g.op("Gather", [x, g.const([0], np.int64)], axis=0)  # [1, d]
        return g.op("Identity", [self.head(cls)], name="logits"), kept_tokens

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

    def head(self, cls: str) -> str:
        """[b, d] first-token states -> logits [b, num_labels]."""
        g = self.g
        if self.model_type == "roberta":
            h = g.op("Tanh", [self.linear(cls, ["classifier.dense"])])
            return self.linear(h, ["classifier.out_proj"])
        pooled = g.op("Tanh", [self.linear(cls, [f"{self.prefix}.pooler.dense"])])
        return self.linear(pooled, ["classifier"])

    def build(self, batch_of_one_branch: bool) -> None:
        """Outputs `logits` and `kept_tokens`. With `batch_of_one_branch` (and threshold or no pruning),
        an `If` on the batch size runs `build_single`'s graph for one sequence (about 40 instead of
        about 65 nodes per layer: no padded grid, masks or index maps; per-node overhead is most of a
        batch of one's time) and `build_general`'s otherwise. Both compute the same thing."""
        g = self.g
        if not batch_of_one_branch or self.pruning.get("mode", "none") == "topk":
            self.build_general()
            return
        from onnx import TensorProto, helper

        one = g.squeeze(g.op("Equal", [g.op("Shape", ["input_ids"], start=0, end=1), g.const([1], np.int64)]), [0])  # []
        outer, branches = g.nodes, {}
        for scope, fn in (("one/", self.build_single), ("many/", self.build_general)):
            g.nodes, g.scope = [], scope
            logits, kept = fn()
            branches[scope] = helper.make_graph(g.nodes, scope.strip("/"), [], [
                helper.make_tensor_value_info(logits, TensorProto.FLOAT, None),
                helper.make_tensor_value_info(kept, TensorProto.INT64, None)])
        g.nodes, g.scope = outer, ""
        g.nodes.append(helper.make_node("If", [one], list(OUTPUT_NAMES), name=BATCH_OF_ONE_IF,
                                        then_branch=branches["one/"], else_branch=branches["many/"]))

    def build_general(self) -> tuple[str, str]:
        """Any batch (mixed lengths, right padding): returns (logits [b, num_labels], kept_tokens [b, L])."""
        g = self.g
        emb = self.embeddings("input_ids", "attention_mask", "token_type_ids")  # [b, s, d]
        mask = g.op("Not", [g.op("Equal", ["attention_mask", g.const(0, np.int64)])])  # [b, s] bool
        lengths = g.reduce_sum(g.op("Cast", [mask], to=7), [1])  # [b] = n0
        real = g.squeeze(g.op("NonZero", [g.reshape(mask, [-1])]), [0])  # [T]
        x = g.op("Gather", [g.reshape(emb, [-1, self.d]), real], axis=0, name="pack_tokens")  # [T, d]
        lay = self.layout(lengths)
        kept = []
        for l in range(self.num_layers):
            kept.append(g.unsqueeze(lay.lengths, [1]))  # [b, 1] tokens entering layer l
            x, lay = self.encoder_layer(l, x, lay, lengths)
        kept_tokens = g.op("Concat", kept, axis=1, name="kept_tokens")  # [b, L]
        first = g.op("Sub", [g.op("CumSum", [lay.lengths, g.const(0, np.int64)]), lay.lengths])  # [b]
        cls = g.op("Gather", [x, first], axis=0)  # [b, d]
        return g.op("Identity", [self.head(cls)], name="logits"), kept_tokens


def num_labels(tensors: dict[str, np.ndarray], config: dict) -> int:
    """Rows of the classifier's last Linear (the number of logits)."""
    name = "classifier.out_proj" if config.get("model_type") == "roberta" else "classifier"
    for suffix in ("w_q", "weight"):
        if f"{name}.{suffix}" in tensors:
            return int(tensors[f"{name}.{suffix}"].shape[0])
    raise ExportError(f"{WEIGHTS_FILE}: classifier '{name}' missing")


def build_onnx_model(tensors: dict[str, np.ndarray], config: dict, ltp: CheckpointInfo | dict, *, opset: int = DEFAULT_OPSET,
                     fuse_qkv: bool = True, int8_op: str = DEFAULT_INT8_OP, batch_of_one_branch: bool = True,
                     attention_op: str | None = None):
    """The onnx.ModelProto for a checkpoint's tensors, HF config and ltp.json (typed, or its parsed JSON); also returns the
    per-GEMM records for ltp_onnx.json and the attention op used (`attention_op`: see ATTENTION_OPS;
    None: the default of `resolve_attention_op`)."""
    import onnx
    from onnx import TensorProto, helper

    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} not supported (choose {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})")
    ltp = parse_checkpoint_info(ltp, LTP_FILE, ExportError)
    q = ltp.quantization
    activation_scales(q, tensors, error=ExportError)  # present, and equal to an older checkpoint's ltp.json copy
    w = _Weights(tensors=tensors, int8_layers=set(q.int8_layers), fused_gelu=set(q.fused_gelu),
                 fp_layers=set(q.fp_layers), act_qmin=q.act_qmin)
    if config.get("model_type") not in ("bert", "roberta"):
        raise ExportError(f"{HF_CONFIG_FILE}: model_type {config.get('model_type')!r} not supported (bert, roberta)")
    pruning = dict(ltp.pruning or {"mode": "none"})
    mode = pruning.get("mode", "none")
    L = int(config["num_hidden_layers"])
    if mode == "threshold" and len(pruning.get("thresholds") or []) < L:
        raise ExportError(f"{LTP_FILE}: threshold pruning needs {L} thresholds, got {pruning.get('thresholds')}")
    if mode == "topk" and len(pruning.get("keep_ratios") or []) < L:
        raise ExportError(f"{LTP_FILE}: topk pruning needs {L} keep_ratios, got {pruning.get('keep_ratios')}")
    if mode not in ("none", "threshold", "topk"):
        raise ExportError(f"{LTP_FILE}: unknown pruning mode {mode!r}")
    if int8_op not in INT8_OPS:
        raise ExportError(f"int8_op {int8_op!r} not supported (choose from {INT8_OPS})")
    attention_op = resolve_attention_op(attention_op, opset, int8_attention=q.attention_matmuls == "int8")
    g = _Graph(opset)
    _Builder(g, config, w, pruning, fuse_qkv, int8_op, attention_op).build(batch_of_one_branch)
    dyn = ["batch", "sequence"]
    graph = helper.make_graph(
        g.nodes, "ltp_pruned_int8_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dyn) for n in INPUT_NAMES],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels(tensors, config)]),
         helper.make_tensor_value_info("kept_tokens", TensorProto.INT64, ["batch", L])],
        initializer=g.initializers)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if int8_op == "MatMulIntegerToFloat" else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="ltp-compress")
    # the oldest IR version that carries the opset (10 up to opset 22, 11 for 23): readable by onnxruntime >= 1.2x
    model.ir_version = min(model.ir_version, 10 if opset < 23 else 11)
    onnx.checker.check_model(model, full_check=int8_op == "MatMulInteger")  # contrib ops have no ONNX schema
    return model, {"linear": w.gemms, "attention": w.attention_gemms, "attention_op": attention_op}


# ----------------------------------------------------------------------------- parity


def _parity(checkpoint_dir: Path, onnx_path: Path, texts: Sequence[str], texts_b: Sequence[str] | None,
            batch_size: int) -> dict:
    """Run the torch runtime (load_deployable) and the ONNX graph on the same tokenised batches:
    argmax agreement, max |logit diff|, kept-token agreement per (example, layer)."""
    import onnxruntime as ort

    from ltp_compress.modeling.deploy import load_deployable

    dm = load_deployable(checkpoint_dir)
    sess = ort.InferenceSession(str(onnx_path), session_options(), providers=["CPUExecutionProvider"])
    agree = total = kept_eq = kept_total = 0
    max_diff = 0.0
    for s in range(0, len(texts), batch_size):
        enc = dm.encode(list(texts[s:s + batch_size]), None if texts_b is None else list(texts_b[s:s + batch_size]))
        ref = dm.logits(enc).numpy()
        ref_kept = dm.last_kept_tokens.numpy()
        feed = {k: (enc[k] if enc[k] is not None else enc["input_ids"] * 0).numpy().astype(np.int64) for k in INPUT_NAMES}
        logits, kept = sess.run(list(OUTPUT_NAMES), feed)
        max_diff = max(max_diff, float(np.abs(logits - ref).max()))
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
        kept_eq += int((kept == ref_kept).sum())
        kept_total += kept.size
    return {"examples": total, "batch_size": batch_size, "argmax_agreement": agree / max(total, 1),
            "max_abs_logit_diff": max_diff, "kept_tokens_agreement": kept_eq / max(kept_total, 1),
            "reference": f"torch runtime load_deployable(...).logits, INT8 backend {dm.backend}",
            "onnxruntime": ort.__version__}


# ----------------------------------------------------------------------------- export


def export_onnx(checkpoint_dir: str | Path, out_dir: str | Path, *, opset: int = DEFAULT_OPSET,
                parity_texts: Sequence[str] | None = None, parity_texts_b: Sequence[str] | None = None,
                parity_batch_size: int = 8, fuse_qkv: bool = True, int8_op: str = DEFAULT_INT8_OP,
                attention_op: str | None = None) -> Path:
    """Export a deployable checkpoint to a self-contained ONNX Runtime folder (atomically: built in
    a temporary sibling folder, renamed at the end). The parity check runs `parity_texts` (or
    BUILTIN_PARITY_TEXTS) through the torch runtime and the graph, in mixed-length batches of
    `parity_batch_size` (sentence pairs: `parity_texts_b`), and records the result in manifest.json
    under "parity". `int8_op`: see INT8_OPS; `fuse_qkv`: one GEMM for Q, K, V when they share their
    activation scale; `attention_op`: see ATTENTION_OPS and `resolve_attention_op`."""
    from safetensors.numpy import load_file

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if opset not in SUPPORTED_OPSETS or int8_op not in INT8_OPS:
        raise ExportError(f"opset {opset} / int8_op {int8_op!r} not supported (opset {SUPPORTED_OPSETS.start}.."
                          f"{SUPPORTED_OPSETS.stop - 1}, int8_op one of {INT8_OPS})")
    resolve_attention_op(attention_op, opset, int8_attention=False)  # a bad name / opset fails before any work
    src_manifest = verify_checkpoint(checkpoint_dir)
    if out_dir.resolve() == checkpoint_dir.resolve() or checkpoint_dir.resolve() in out_dir.resolve().parents:
        raise ExportError(f"{out_dir}: the export folder must not be (inside) the checkpoint {checkpoint_dir}")
    ltp = parse_checkpoint_info(load_json(checkpoint_dir / LTP_FILE, ExportError), checkpoint_dir / LTP_FILE, ExportError)
    config = load_json(checkpoint_dir / HF_CONFIG_FILE, ExportError)
    tensors = load_file(str(checkpoint_dir / WEIGHTS_FILE))
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(checkpoint_dir))  # id2label with the library's defaults filled in
    try:
        model, gemms = build_onnx_model(tensors, config, ltp, opset=opset, fuse_qkv=fuse_qkv, int8_op=int8_op,
                                        attention_op=attention_op)
        attention_gemms, attention_op, gemms = gemms["attention"], gemms["attention_op"], gemms["linear"]
    except ExportError as e:  # messages start with the file name inside the checkpoint
        raise ExportError(f"{checkpoint_dir}/{e}") from None

    from tokenizers import Tokenizer

    tok_cfg = {}
    if (checkpoint_dir / "tokenizer_config.json").is_file():
        tok_cfg = load_json(checkpoint_dir / "tokenizer_config.json", ExportError)
    if not (checkpoint_dir / TOKENIZER_FILE).is_file():
        raise ExportError(f"{checkpoint_dir / TOKENIZER_FILE}: missing (the export needs a fast tokenizer file)")
    if parity_texts_b is not None and (not parity_texts or len(parity_texts_b) != len(parity_texts)):
        raise ExportError("parity_texts_b needs parity_texts of the same length")
    pad_token = tok_cfg.get("pad_token")
    pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
    pad_id = Tokenizer.from_file(str(checkpoint_dir / TOKENIZER_FILE)).token_to_id(pad_token) if pad_token else None
    if pad_id is None:
        pad_id, pad_token = int(config.get("pad_token_id") or 0), pad_token or "[PAD]"
    q = ltp.quantization
    info = ExportInfo(
        format=EXPORT_FORMAT, format_version=EXPORT_FORMAT_VERSION, model_type=config["model_type"],
        num_labels=num_labels(tensors, config),
        id2label={str(k): v for k, v in hf_config.id2label.items()},  # as the torch runtime names them
        max_seq_length=ltp.max_seq_length, pad_token=pad_token, pad_token_id=int(pad_id),
        inputs=list(INPUT_NAMES), outputs=list(OUTPUT_NAMES), opset=opset,
        num_layers=int(config["num_hidden_layers"]), pruning=ltp.pruning or {"mode": "none"},
        pruning_rule="score_l(i) = 1/H * sum_h sum_{j real, present} A_h(j, i); keep iff score > thresholds[l] "
                        "(topk: the ceil(keep_ratios[l] * n0) best); position 0 always kept; the last layer prunes nothing; "
                     "pruned tokens skip layer l's output projection and FFN",
        quantization=ExportQuantization(
            int8_gemms=gemms, int8_layers=q.int8_layers, fused_gelu=q.fused_gelu, fp_layers=q.fp_layers, weight_qmax=q.weight_qmax,
            activation_range=q.activation_range, int8_op=int8_op,
            scheme="QuantizeLinear(u8, zp 128) + integer GEMM with int8 per-channel weights, checkpoint scales",
            attention_matmuls=q.attention_matmuls, int8_attention_gemms=attention_gemms,
            attention_scheme=("Q, K, V int8 (checkpoint scales, per-axis QuantizeLinear), probabilities uint8 at 1/255; "
                              "MatMulInteger (exact int32) for Q·Kᵀ and P·V") if attention_gemms else
                             "float32, one ONNX Attention op per layer (probabilities as its 4th output)"
                             if attention_op == "Attention" else "float32 MatMul"),
        attention_op=attention_op,
        session_options=RECOMMENDED_SESSION_OPTIONS,
        source=ExportSource(checkpoint=str(checkpoint_dir.resolve()), weights_sha256=src_manifest["files"][WEIGHTS_FILE]["sha256"]),
    )
    with atomic_folder(out_dir) as tmp:
        import onnx

        onnx.save_model(model, str(tmp / ONNX_FILE))
        for p in sorted(checkpoint_dir.iterdir()):
            if p.is_file() and p.name not in _NOT_COPIED:
                shutil.copyfile(p, tmp / p.name)
        write_export_info(tmp, info)
        texts = list(parity_texts) if parity_texts else list(BUILTIN_PARITY_TEXTS)
        parity = _parity(checkpoint_dir, tmp / ONNX_FILE, texts, parity_texts_b if parity_texts else None, parity_batch_size)
        parity["inputs"] = "given texts" if parity_texts else "built-in sentences (BUILTIN_PARITY_TEXTS)"
        write_manifest(tmp, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, {"parity": parity})
    return out_dir
