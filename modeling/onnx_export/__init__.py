"""ONNX export of a deployable checkpoint: token pruning and static INT8 inside one graph.

`export_onnx(checkpoint_dir, out_dir)` turns a deployable checkpoint (modeling/deploy.py) into a
folder that plain ``onnxruntime`` runs without ltp_compress installed; the folder's files and its
ltp_onnx.json are the export format's (modeling/export_format.py, what the runtime reads), the
graph is built here. The package, by graph part::

    graph.py         _Graph: node / initializer helper (unique names, shared initializers, constants)
    weights.py       the checkpoint's tensors and quantisation facts, the int8 GEMM records
    int8_linear.py   Linear layers: QuantizeLinear + integer GEMM with the checkpoint's scales; GELU
    attention.py     attention forms: the ONNX Attention op, the MatMul subgraph, INT8 MatMulInteger
    layout.py        packed rows [T, d] and the padded per-layer attention grid [b, S]
    pruning.py       scores, threshold / top-k keep, Gather / Compress of the kept rows
    batch_of_one.py  the `If` branch a batch of one sequence takes
    builder.py       the layer loop composing the parts; build_onnx_model
    export.py        export_onnx: the folder, written atomically, and its parity check

Graph (opset >= 17; shapes: b batch, s input length, T tokens still present in the batch, S the
longest surviving sequence at the current layer, d hidden, H heads, dh = d / H):

* inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [b, s] (dynamic axes);
  outputs ``logits`` float [b, num_labels] and ``kept_tokens`` int64 [b, L] (tokens entering
  each layer; the same as ``DeployedModel.last_kept_tokens``).
* Embeddings on the padded [b, s] input (BERT: positions 0..s-1; RoBERTa: positions from
  input_ids and padding_idx; a single token type ignores ``token_type_ids``), LayerNorm, then the
  real tokens are **packed** into x [T, d] (row-major by sequence, then position; right padding
  assumed like the torch runtime). Every Linear runs on the packed rows only: padding and pruned
  tokens never enter a GEMM (why packed rows: layout.py).
* Per layer: Q/K/V -> the per-layer attention grid -> attention (attention.py) -> pruning, not in
  the last layer (pruning.py) -> output projection and FFN on the kept rows (int8_linear.py).
* The classifier reads each sequence's first packed row (CumSum of the lengths).
* Batch of one (threshold or no pruning): an ``If`` on the batch size runs a leaner branch with the
  same math and the same initializers (batch_of_one.py). Top-k checkpoints keep the one general graph.

Note on non-VNNI x86 CPUs: ORT's u8 x s8 kernels there use vpmaddubsw (int16 pair sums that
can saturate with 8-bit weights). A checkpoint quantised with 7-bit weights (``weight_qmax``
63, backend cpu_avx2) is exact everywhere; ``weight_qmax`` is recorded in ltp_onnx.json.
"""

from __future__ import annotations

from ltp_compress.manifest import MANIFEST_FILE
from ltp_compress.modeling.export_format import (
    BATCH_OF_ONE_IF, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, EXPORT_REQUIRED_FILES, HF_CONFIG_FILE, INPUT_NAMES, INT8_OPS,
    INTEGER_GEMM_OPS, ONNX_CONFIG_FILE, ONNX_FILE, OUTPUT_NAMES, RECOMMENDED_SESSION_OPTIONS, TOKENIZER_FILE, ExportError,
    ExportInfo, ExportQuantization, ExportSource, session_options, verify_export, write_export_info,
)
from ltp_compress.modeling.onnx_export.attention import ATTENTION_OP_MIN_OPSET, ATTENTION_OPS, resolve_attention_op
from ltp_compress.modeling.onnx_export.builder import DEFAULT_OPSET, SUPPORTED_OPSETS, build_onnx_model, num_labels
from ltp_compress.modeling.onnx_export.export import BUILTIN_PARITY_TEXTS, export_onnx
from ltp_compress.modeling.onnx_export.int8_linear import DEFAULT_INT8_OP, GELU_MIN_BOUND

__all__ = [
    # the export and the graph
    "export_onnx", "build_onnx_model", "num_labels", "resolve_attention_op", "BUILTIN_PARITY_TEXTS",
    "DEFAULT_OPSET", "SUPPORTED_OPSETS", "DEFAULT_INT8_OP", "ATTENTION_OPS", "ATTENTION_OP_MIN_OPSET", "GELU_MIN_BOUND",
    # the export folder's format (modeling/export_format.py, ltp_compress/manifest.py), re-exported
    "BATCH_OF_ONE_IF", "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "EXPORT_REQUIRED_FILES", "HF_CONFIG_FILE", "INPUT_NAMES",
    "INT8_OPS", "INTEGER_GEMM_OPS", "MANIFEST_FILE", "ONNX_CONFIG_FILE", "ONNX_FILE", "OUTPUT_NAMES",
    "RECOMMENDED_SESSION_OPTIONS", "TOKENIZER_FILE", "ExportError", "ExportInfo", "ExportQuantization", "ExportSource",
    "session_options", "verify_export", "write_export_info",
]
