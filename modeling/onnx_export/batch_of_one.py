"""The batch-of-one branch: the graph a batch of one sequence takes, under a top-level ``If`` on the
batch size.

Batch of one (threshold or no pruning): an ``If`` on the batch size runs a second branch with the
same math and the same initializers but none of the padding machinery (no grid, masks or index
maps: the sequence's present rows are the attention grid; position 0 is kept by one ScatterElements,
pruned rows leave by Compress): about 40 instead of about 65 nodes per layer, and at ~25 tokens per-node
overhead, not arithmetic, is most of a batch of one's time (docs/design.md, "Design notes").
Top-k checkpoints keep the one general graph.

The functions take the builder (modeling/onnx_export/builder.py `_Builder`) whose parts they compose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ltp_compress.modeling.export_format import BATCH_OF_ONE_IF, OUTPUT_NAMES

if TYPE_CHECKING:
    from ltp_compress.modeling.onnx_export.builder import _Builder


def single_layer(builder: _Builder, l: int, x: str) -> str:
    """The batch-of-one branch: x [T, d] (the sequence's present tokens, no padding anywhere) ->
    [T', d]. The same math as `encoder_layer` without the padded grid, masks or index maps."""
    g, d, H, att = builder.g, builder.d, builder.heads, builder.att
    dh = d // H
    p = f"{builder.prefix}.encoder.layer.{l}"
    qkv = builder.qkv(x, p)  # [T, 3d]
    # the spelled-out subgraph even where the batch graph uses the fused Attention op: for one sequence the
    # fused op measured slower in ORT 1.31 (benchmarks/results/design_observations.md); Q, K, V
    # stay one GEMM here (three as in the batch graph measured slower at bs 1: design_observations.md)
    heads = g.op("Transpose", [g.reshape(qkv, [-1, 3, H, dh])], perm=[1, 2, 0, 3])  # [3, H, T, dh]
    scales = att.attention_scales(p)
    if scales is not None:
        heads = att.quantize_qkv(heads, p, scales, axis=0, rank=4)  # [3, H, T, dh] int8
    q, k, v = g.op("Split", [heads, g.const([1, 1, 1], np.int64)], n_out=3, axis=0)  # [1, H, T, dh] each
    kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])  # [1, H, dh, T] (ORT folds it into the MatMul)
    scores = att.attention_scores(q, kt, p, scales)  # [1, H, T, T]
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.reshape(g.op("Transpose", [att.attention_context(probs, v, p, scales)], perm=[0, 2, 1, 3]), [-1, d])  # [T, d]
    ctx, x = builder.prune.single(l, ctx, x, probs)  # the kept rows [T', d]
    return builder.post_attention(p, ctx, x)


def build_single(builder: _Builder) -> tuple[str, str]:
    """Batch of one: returns (logits [1, num_labels], kept_tokens [1, L])."""
    g = builder.g
    emb = builder.embeddings("input_ids", "attention_mask", "token_type_ids")  # [1, s, d]
    mask = g.op("Not", [g.op("Equal", ["attention_mask", g.const(0, np.int64)])])  # [1, s]
    n = g.reduce_sum(g.op("Cast", [mask], to=7), [1])  # [1] tokens (right padding, like the torch runtime)
    x = g.op("Slice", [g.reshape(emb, [-1, builder.d]), g.const([0], np.int64), n], name="pack_tokens")  # [T, d]
    kept = []
    for l in range(builder.num_layers):
        kept.append(g.op("Shape", [x], start=0, end=1))  # [1] tokens entering layer l
        x = single_layer(builder, l, x)
    kept_tokens = g.unsqueeze(g.op("Concat", kept, axis=0), [0], name="kept_tokens")  # [1, L]
    cls = g.op("Gather", [x, g.const([0], np.int64)], axis=0)  # [1, d]
    return g.op("Identity", [builder.head(cls)], name="logits"), kept_tokens


def build_with_batch_of_one_branch(builder: _Builder) -> None:
    """The graph's outputs from an `If` (`BATCH_OF_ONE_IF`) on the batch size: then `build_single`'s
    branch (one sequence), else the builder's `build_general` (any batch). Both branches share the
    initializers and name their nodes under their own scope ("one/", "many/")."""
    from onnx import TensorProto, helper

    g = builder.g
    one = g.squeeze(g.op("Equal", [g.op("Shape", ["input_ids"], start=0, end=1), g.const([1], np.int64)]), [0])  # []
    outer, branches = g.nodes, {}
    for scope, fn in (("one/", lambda: build_single(builder)), ("many/", builder.build_general)):
        g.nodes, g.scope = [], scope
        logits, kept = fn()
        branches[scope] = helper.make_graph(g.nodes, scope.strip("/"), [], [
            helper.make_tensor_value_info(logits, TensorProto.FLOAT, None),
            helper.make_tensor_value_info(kept, TensorProto.INT64, None)])
    g.nodes, g.scope = outer, ""
    g.nodes.append(helper.make_node("If", [one], list(OUTPUT_NAMES), name=BATCH_OF_ONE_IF,
                                    then_branch=branches["one/"], else_branch=branches["many/"]))
