"""The graph builder: `build_onnx_model` and the `_Builder` that composes the graph's parts (Linears,
attention, pruning, the batch-of-one branch) layer by layer: embeddings, packing of the real tokens,
the encoder layers, the classifier."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ltp_compress.modeling.checkpoint_format import LTP_FILE, WEIGHTS_FILE, CheckpointInfo, activation_scales, parse_checkpoint_info
from ltp_compress.modeling.export_format import HF_CONFIG_FILE, INPUT_NAMES, INT8_OPS, ExportError
from ltp_compress.modeling.onnx_export.attention import _Attention, resolve_attention_op
from ltp_compress.modeling.onnx_export.batch_of_one import build_with_batch_of_one_branch
from ltp_compress.modeling.onnx_export.graph import _Graph
from ltp_compress.modeling.onnx_export.int8_linear import DEFAULT_INT8_OP, _Linears
from ltp_compress.modeling.onnx_export.layout import _Layout, layout
from ltp_compress.modeling.onnx_export.pruning import _Pruning
from ltp_compress.modeling.onnx_export.weights import _Weights

DEFAULT_OPSET = 23
SUPPORTED_OPSETS = range(17, 24)


class _Builder:
    """Emits the pruned INT8 encoder graph for one checkpoint (see the package docstring): the layer loop,
    composing the Linears (`lin`), attention (`att`) and pruning (`prune`) parts, all writing into `g`."""

    def __init__(self, g: _Graph, cfg: dict, w: _Weights, pruning: dict, fuse_qkv: bool, int8_op: str, attention_op: str):
        self.g, self.cfg, self.w, self.pruning, self.fuse_qkv = g, cfg, w, pruning, fuse_qkv
        self.model_type = cfg["model_type"]
        self.prefix = {"bert": "bert", "roberta": "roberta"}[self.model_type]
        self.d = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.num_layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.lin = _Linears(g, w, int8_op, cfg.get("hidden_act", "gelu"))
        self.att = _Attention(g, w, self.d, self.heads, attention_op)
        self.prune = _Pruning(g, pruning, self.heads, self.num_layers)

    # -- pieces ----------------------------------------------------------------------------

    def param(self, name: str) -> str:
        """A float tensor of the checkpoint as an initializer under its own name."""
        return self.w.param(self.g, name)

    def linear(self, x: str, names: Sequence[str]) -> str:
        """x [T, K] -> [T, sum N] for the Linear layers `names` (modeling/onnx_export/int8_linear.py)."""
        return self.lin.linear(x, names)

    def layer_norm(self, x: str, name: str) -> str:
        return self.g.op("LayerNormalization", [x, self.param(f"{name}.weight"), self.param(f"{name}.bias")],
                         axis=-1, epsilon=self.eps)

    def add_layer_norm(self, y: str, residual: str, name: str) -> str:
        """LayerNorm(y + residual). (ORT's contrib SkipLayerNormalization on our 2-D [T, d] rows was tried:
        slower here and its outputs differed: benchmarks/results/design_observations.md.)"""
        return self.layer_norm(self.g.op("Add", [y, residual]), name)

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
        tte = self.w.tensor(f"{p}.token_type_embeddings.weight")
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
        x_scale = self.lin.shared_int8_scale(names) if self.fuse_qkv else None
        return None if x_scale is None else self.lin.int8_gemm(x, names, x_scale, split_outputs=True)

    def encoder_layer(self, l: int, x: str, lay: _Layout, n0: str) -> tuple[str, _Layout]:
        """x [T, d] packed -> [T', d] packed (T' = tokens kept after this layer)."""
        g = self.g
        p = f"{self.prefix}.encoder.layer.{l}"
        b = g.op("Shape", [lay.valid], start=0, end=1)  # [1]
        scales = self.att.attention_scales(p)
        # with the fused Attention op, Q, K, V come from three GEMMs on one quantised x, each gathered straight
        # into the grid: no Split copy of the [b, S, 3d] grid (measured faster at bs 8 / 32 on SST-2 and MRPC:
        # docs/design.md, "Design notes"); the batch-of-one branch keeps the one QKV GEMM
        parts = self.qkv_parts(x, p) if self.att.uses_fused_op(scales) else None
        grid = None
        if parts is None:
            qkv = self.qkv(x, p)  # [T, 3d]
            # packed rows -> the per-layer attention grid by one Gather (a padded slot reads row 0: its key is
            # masked below, its query row never reaches the output or the scores). It replaces ConstantOfShape
            # zeros + ScatterND, a large share of the old graph's time at bs 32 in ORT 1.31's profile (docs/design.md, "Design notes").
            grid = g.op("Gather", [qkv, lay.grid_rows], axis=0, name=f"layer{l}.to_grid")  # [b*S, 3d]
        scores_needed = self.prune.scores_needed(l)
        ctx, probs = self.att.batch_attention(l, p, lay, b, grid, parts, scales, scores_needed)  # [b*S, d], [b, H, S, S] | None
        if scores_needed:
            ctx, x, lay = self.prune.batch(l, ctx, x, probs, lay, n0)  # the kept rows [T', d]; the next layer's grid
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
        batch of one's time) and `build_general`'s otherwise (modeling/onnx_export/batch_of_one.py).
        Both compute the same thing."""
        if not batch_of_one_branch or self.prune.mode == "topk":
            self.build_general()
            return
        build_with_batch_of_one_branch(self)

    def build_general(self) -> tuple[str, str]:
        """Any batch (mixed lengths, right padding): returns (logits [b, num_labels], kept_tokens [b, L])."""
        g = self.g
        emb = self.embeddings("input_ids", "attention_mask", "token_type_ids")  # [b, s, d]
        mask = g.op("Not", [g.op("Equal", ["attention_mask", g.const(0, np.int64)])])  # [b, s] bool
        lengths = g.reduce_sum(g.op("Cast", [mask], to=7), [1])  # [b] = n0
        real = g.squeeze(g.op("NonZero", [g.reshape(mask, [-1])]), [0])  # [T]
        x = g.op("Gather", [g.reshape(emb, [-1, self.d]), real], axis=0, name="pack_tokens")  # [T, d]
        lay = layout(g, lengths)
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
                 fp_layers=set(q.fp_layers), act_qmin=q.act_qmin, model_type=config.get("model_type"))
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
