"""The ONNX export folder's format: its files, its ltp_onnx.json (typed: `ExportInfo`, its one reader
and writer), its verification, the ONNX Runtime session settings every session of ours uses, the
graph's names the runtime reads, and the ONNX op types that are integer GEMMs. Light (no torch, no
onnx); the graph is built by modeling/onnx_export/ (the package) and run by modeling/onnx_runtime.py.

An export folder (`export_onnx`, modeling/onnx_export/export.py) runs in plain ``onnxruntime``
without ltp_compress installed::

    model.onnx        the graph (weights as initializers)
    ltp_onnx.json     model_type, id2label, max_seq_length, input/output names, pruning rule,
                      which int8 GEMM node uses which checkpoint layers and scales (typed:
                      ExportInfo, its one reader and writer)
    config.json       the Hugging Face config (copied from the checkpoint)
    tokenizer files   copied from the checkpoint (tokenizer.json is enough for `tokenizers`)
    manifest.json     {"format": "ltp-compress-onnx", "files": {name: {size, sha256}},
                       "parity": the export-time check against the torch runtime}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ltp_compress.errors import CheckpointError
from ltp_compress.json_model import load_json, parse_json_model, write_json_model
from ltp_compress.kernels.backends import LEGACY_ACTIVATION_RANGE
from ltp_compress.manifest import MANIFEST_FILE, verify_manifest
from ltp_compress.modeling.checkpoint_format import LTP_FILE, WEIGHTS_FILE, ActivationRange, AttentionMatmuls
from ltp_compress.sequence_length import DEFAULT_MAX_SEQ_LENGTH

EXPORT_FORMAT = "ltp-compress-onnx"
EXPORT_FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
ONNX_CONFIG_FILE = "ltp_onnx.json"
HF_CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"  # the `tokenizers` file the runtime and the README snippet read
EXPORT_REQUIRED_FILES = (ONNX_FILE, ONNX_CONFIG_FILE)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("logits", "kept_tokens")
#: checkpoint files that are not copied into the export (everything else is: config + tokenizer)
NOT_COPIED_FROM_CHECKPOINT = (WEIGHTS_FILE, LTP_FILE, MANIFEST_FILE)
#: the graph's top-level `If` that sends a batch of one sequence to its own branch (then: batch of one,
#: else: any batch); the runtime splits the graph there (modeling/onnx_runtime.py branch_models)
BATCH_OF_ONE_IF = "batch_of_one"

# how an INT8 linear is expressed: standard ONNX MatMulInteger + float epilogue (portable), or ORT's
# contrib MatMulIntegerToFloat (one kernel incl. scales and bias; onnxruntime only)
INT8_OPS = ("MatMulInteger", "MatMulIntegerToFloat")

#: ONNX / ONNX Runtime op types that run an integer GEMM (an optimised ORT graph's profile shows one
#: of these per int8 GEMM). The one list; our export emits only INT8_OPS.
INTEGER_GEMM_OPS: tuple[str, ...] = (
    "MatMulInteger",  # ONNX: uint8/int8 x int8 -> int32 accumulators (float epilogue separate)
    "MatMulIntegerToFloat",  # ORT contrib: the same with scales, zero points and bias applied, float output
    "QLinearMatMul",  # ONNX: quantised in, quantised out (QDQ graphs after ORT's fusion)
    "DynamicQuantizeMatMul",  # ORT contrib: dynamic quantisation of the input fused with the integer GEMM
    "QAttention",  # ORT contrib: quantised attention block (its Q/K/V projection GEMM)
    "QGemm",  # ORT contrib: quantised Gemm (QDQ Gemm after ORT's fusion)
)
#: integer convolutions (integer work in an ORT CPU graph, but not GEMMs)
INTEGER_CONV_OPS: tuple[str, ...] = ("ConvInteger", "QLinearConv")

#: ORT's documented CPU latency settings: every session of ours applies them (`session_options`), the
#: export records them in ltp_onnx.json
RECOMMENDED_SESSION_OPTIONS = {"intra_op_num_threads": "threads", "inter_op_num_threads": 1,
                               "execution_mode": "ORT_SEQUENTIAL", "graph_optimization_level": "ORT_ENABLE_ALL"}


def session_options(threads: int | None = None, *, profile_prefix: str | None = None,
                    graph_optimization_level: str = RECOMMENDED_SESSION_OPTIONS["graph_optimization_level"]):
    """An onnxruntime.SessionOptions with RECOMMENDED_SESSION_OPTIONS: intra-op threads `threads` (None:
    ORT's default, one per physical core), one inter-op thread, sequential execution, all graph
    optimisations (`graph_optimization_level`: another ort.GraphOptimizationLevel name, e.g.
    'ORT_DISABLE_ALL' to read an intermediate output); `profile_prefix`: ORT's profiler on, its file there."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = RECOMMENDED_SESSION_OPTIONS["inter_op_num_threads"]
    so.execution_mode = getattr(ort.ExecutionMode, RECOMMENDED_SESSION_OPTIONS["execution_mode"])
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, graph_optimization_level)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return so


class ExportError(CheckpointError):
    """An ONNX export folder that is missing, incomplete, corrupted, or cannot be produced."""


class ExportQuantization(BaseModel):
    """ltp_onnx.json's "quantization". Field order is the file's key order."""

    model_config = ConfigDict(extra="forbid")

    int8_gemms: list[dict[str, Any]]  # one record per int8 GEMM node: node, layers, initializers, fused_gelu, graphs
    int8_layers: list[str] | None = None
    fused_gelu: list[str] = Field(default_factory=list)
    fp_layers: list[str] = Field(default_factory=list)
    weight_qmax: int | None = None
    activation_range: ActivationRange = LEGACY_ACTIVATION_RANGE  # absent: an export written before the key existed
    int8_op: Literal[INT8_OPS] = "MatMulInteger"
    scheme: str | None = None
    attention_matmuls: AttentionMatmuls = "fp32"
    int8_attention_gemms: list[str] = Field(default_factory=list)
    attention_scheme: str | None = None


class ExportSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str  # the deployable checkpoint folder, resolved
    weights_sha256: str  # its model.safetensors


class ExportInfo(BaseModel):
    """An export folder's ltp_onnx.json. Field order is the file's key order."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[EXPORT_FORMAT] = EXPORT_FORMAT
    format_version: Literal[EXPORT_FORMAT_VERSION] = EXPORT_FORMAT_VERSION
    model_type: str
    num_labels: int = Field(ge=1)
    id2label: dict[str, str] = Field(default_factory=dict)
    max_seq_length: int = Field(DEFAULT_MAX_SEQ_LENGTH, ge=1)
    pad_token: str
    pad_token_id: int
    inputs: list[str]
    outputs: list[str]
    opset: int
    num_layers: int
    pruning: dict[str, Any]  # modeling/pruned_encoder.py PruningConfig.to_dict()
    pruning_rule: str | None = None
    quantization: ExportQuantization
    attention_op: str | None = None  # absent: an export written before the option (MatMul)
    session_options: dict[str, Any] = Field(default_factory=dict)
    source: ExportSource | None = None

    @field_validator("inputs")
    @classmethod
    def _our_inputs(cls, v: list[str]) -> list[str]:
        if v != list(INPUT_NAMES):
            raise ValueError(f"expected {list(INPUT_NAMES)}")
        return v


def verify_export(path: str | Path) -> dict:
    """Check an export folder against its manifest.json (every listed file present with the same
    size and sha256, no unlisted file); returns the manifest. Raises ExportError naming the file."""
    return verify_manifest(Path(path), EXPORT_FORMAT, EXPORT_FORMAT_VERSION, EXPORT_REQUIRED_FILES, error=ExportError,
                           what="ONNX export")


def read_export_info(path: str | Path, *, verify: bool = True) -> ExportInfo:
    """The export folder's ltp_onnx.json, after verifying every file against the manifest (`verify`);
    another format or version, an unknown field or a wrong type raises ExportError naming the file and field."""
    path = Path(path)
    if verify:
        verify_export(path)
    file = path / ONNX_CONFIG_FILE
    obj = load_json(file, ExportError)
    if isinstance(obj, dict) and (obj.get("format") != EXPORT_FORMAT or obj.get("format_version") != EXPORT_FORMAT_VERSION):
        raise ExportError(f"{file}: not an ltp-compress ONNX export description (format {obj.get('format')!r} version "
                          f"{obj.get('format_version')!r}; this version reads {EXPORT_FORMAT!r} version {EXPORT_FORMAT_VERSION})")
    return parse_json_model(ExportInfo, obj, file, ExportError)


def write_export_info(folder: str | Path, info: ExportInfo) -> None:
    """ltp_onnx.json into `folder` (the fields that were set, in the model's order)."""
    write_json_model(Path(folder) / ONNX_CONFIG_FILE, info)
