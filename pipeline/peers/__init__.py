"""The benchmarked systems, one module per family:

    hf.py                 HF FP32 (sdpa: the baseline; eager), HF bf16 (sdpa)
    torch_peers.py        torch.ao dynamic INT8, Neural Compressor PT2E static INT8, torchao static INT8
    onnxruntime_peers.py  ONNX Runtime FP32 (transformer optimizer), INT8 dynamic, INT8 static (QDQ)
    openvino_peers.py     OpenVINO FP32, OpenVINO at its default precision, OpenVINO INT8 (NNCF)
    ours.py               LTP FP32, dense INT8, LTP INT8 on torch; LTP INT8 and dense INT8 on ONNX Runtime; LTP INT8 on
                          the fused C++ runtime

`REGISTRY` says, per system name (the names and groups are `pipeline.bench_args`'s), its module
and builder (imported lazily: a missing package fails only that system), which model it is built
from, its FP32 reference (for the INT8-vs-FP32 accuracy check) and the op names its profile must
show for its fast path to count as confirmed (groups: one of each group, case-insensitive
substring of an op name), and what the benchmark does for it beyond measuring: the project's
kernel counters (`kernel_counters`), the op-class profile (`op_class_profile`), and, for a pruned
system, the dense system on the same runtime its token-pruning speedup is measured against
(`pruning_vs`, `runtime`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ltp_compress.modeling.export_format import INTEGER_GEMM_OPS
from ltp_compress.pipeline.peers.common import BenchError, System

TORCH_INT8_OPS = ("qlinear", "quantized", "_int_mm", "int8", "onednn")


@dataclass(frozen=True)
class Peer:
    module: str
    builder: str
    needs: str  # "teacher" | "hard" | "int8"
    description: str
    fp32_reference: str | None = None
    fast_ops: tuple[tuple[str, ...], ...] = ()
    packages: tuple[str, ...] = ()  # import names the peer needs beyond torch / transformers
    kernel_counters: bool = False  # runs the project's INT8 kernels: their call counters are recorded
    op_class_profile: bool = False  # gets bench_profile.profile_int8's op-class profile
    pruning_vs: str | None = None  # pruned system: the dense system on the same runtime (realised pruning speedup)
    runtime: str | None = None  # the runtime a pruning pair runs on (torch, onnxruntime)


REGISTRY: dict[str, Peer] = {
    "hf_fp32_sdpa": Peer("hf", "build_hf_fp32_sdpa", "teacher", "HF model, FP32, default attention (sdpa), dense: the baseline"),
    "hf_fp32_eager": Peer("hf", "build_hf_fp32_eager", "teacher", "HF model, FP32, eager attention, dense"),
    "ort_fp32": Peer("onnxruntime_peers", "build_ort_fp32", "teacher",
                     "ONNX Runtime FP32: torch.onnx.export + transformer optimizer (fused Attention, SkipLayerNorm, BiasGelu)",
                     fast_ops=(("Attention",), ("SkipLayerNormalization",), ("BiasGelu", "FastGelu", "Gelu")),
                     packages=("onnxruntime", "onnx")),
    "openvino_fp32": Peer("openvino_peers", "build_openvino_fp32", "teacher",
                          "OpenVINO FP32 (convert_model from the HF model, INFERENCE_PRECISION_HINT=f32)",
                          fast_ops=(("FullyConnected/f32",),), packages=("openvino",)),
    "hf_bf16_sdpa": Peer("hf", "build_hf_bf16_sdpa", "teacher",
                         "HF model, model.to(torch.bfloat16), default attention (sdpa), dense: what a user gets in bf16",
                         "hf_fp32_sdpa"),
    "openvino_default": Peer("openvino_peers", "build_openvino_default", "teacher",
                             "OpenVINO with its default inference precision (bf16 where the CPU supports it, else f32)",
                             "hf_fp32_sdpa", (("FullyConnected/",),), packages=("openvino",)),
    "torch_dynamic_int8": Peer("torch_peers", "build_torch_dynamic_int8", "teacher",
                               "torch.ao quantize_dynamic (Linear, qint8, dynamic activations), eager",
                               "hf_fp32_sdpa", (TORCH_INT8_OPS,)),
    "inc_static_int8": Peer("torch_peers", "build_inc_static_int8", "teacher",
                            "Neural Compressor PT2E static INT8 + torch.compile (inductor freezing)", "hf_fp32_sdpa",
                            (TORCH_INT8_OPS,), ("neural_compressor",)),
    "torchao_static_int8_compiled": Peer("torch_peers", "build_torchao_static_int8_compiled", "teacher",
                                         "torchao Int8StaticActivationInt8WeightConfig + torch.compile (inductor freezing)",
                                         "hf_fp32_sdpa", (TORCH_INT8_OPS,), ("torchao",)),
    "ort_int8_dynamic": Peer("onnxruntime_peers", "build_ort_int8_dynamic", "teacher",
                             "ONNX Runtime INT8 quantize_dynamic (per-channel QInt8) on the optimized graph", "ort_fp32",
                             (INTEGER_GEMM_OPS,), ("onnxruntime", "onnx")),
    "ort_int8_static": Peer("onnxruntime_peers", "build_ort_int8_static", "teacher",
                            "ONNX Runtime INT8 quantize_static (QDQ, S8S8, per-channel, MinMax calibration) on the optimized graph",
                            "ort_fp32", (INTEGER_GEMM_OPS,), ("onnxruntime", "onnx")),
    "openvino_int8": Peer("openvino_peers", "build_openvino_int8", "teacher",
                          "OpenVINO INT8: NNCF quantize (model_type=TRANSFORMER, default preset)", "openvino_fp32",
                          (("FullyConnected/u8", "FullyConnected/i8", "MatMul/u8", "MatMul/i8"),), ("openvino", "nncf")),
    "ltp_fp32": Peer("ours", "build_ltp_fp32", "hard", "ours: hard-pruned FP32, packed token-removing runtime (torch)"),
    "dense_int8": Peer("ours", "build_dense_int8", "teacher",
                       "ours: teacher, static W8A8 (our calibrate + convert_to_int8), packed runtime (torch), no pruning",
                       "hf_fp32_sdpa", kernel_counters=True),
    "ltp_int8": Peer("ours", "build_ltp_int8", "int8", "ours: deployable checkpoint, token removal + INT8 GEMMs (torch)", "ltp_fp32",
                     kernel_counters=True, op_class_profile=True, pruning_vs="dense_int8", runtime="torch"),
    "dense_int8_ort": Peer("ours", "build_dense_int8_ort", "teacher",
                           "ours: dense_int8 saved as a deployable checkpoint, exported to ONNX, run by ONNX Runtime",
                           "dense_int8", (("MatMulIntegerToFloat", "MatMulInteger"),), ("onnxruntime", "onnx")),
    "ltp_int8_ort": Peer("ours", "build_ltp_int8_ort", "int8",
                         "ours: the deployable checkpoint exported to ONNX (pruning in the graph), run by ONNX Runtime",
                         "ltp_int8", (("MatMulIntegerToFloat", "MatMulInteger"),), ("onnxruntime", "onnx"),
                         pruning_vs="dense_int8_ort", runtime="onnxruntime"),
    "dense_int8_fused": Peer("ours", "build_dense_int8_fused", "teacher",
                             "ours: dense_int8 saved as a deployable checkpoint, run by the fused C++ runtime", "dense_int8"),
    "ltp_int8_fused": Peer("ours", "build_ltp_int8_fused", "int8",
                           "ours: the deployable checkpoint on the fused C++ runtime (one call per batch, AVX-512 VNNI GEMMs)",
                           "ltp_int8", pruning_vs="dense_int8_fused", runtime="fused"),
}


def missing_packages(name: str) -> list[str]:
    """Import names of the packages `name` needs that are not installed."""
    import importlib.util

    return [p for p in REGISTRY[name].packages if importlib.util.find_spec(p) is None]


def build(name: str, inp) -> System:
    """Build system `name` (its module imported now)."""
    peer = REGISTRY.get(name)
    if peer is None:
        raise BenchError(f"unknown system {name!r}; choose from {list(REGISTRY)}")
    missing = missing_packages(name)
    if missing:
        raise BenchError(f"{name}: package(s) {missing} not installed (pip install -c requirements-lock.txt -e '.[peers,onnx]')")
    mod = importlib.import_module(f"ltp_compress.pipeline.peers.{peer.module}")
    return getattr(mod, peer.builder)(inp)


def check_fast_ops(name: str, op_names) -> dict:
    """Whether the profile's op names show every expected fast-op group of `name`."""
    groups = REGISTRY[name].fast_ops
    names = [str(n) for n in op_names]
    found = {" | ".join(g): sorted({n for n in names if any(x.lower() in n.lower() for x in g)}) for g in groups}
    return {"expected_groups": [list(g) for g in groups], "found": found,
            "confirmed": bool(groups) and all(found.values()) if groups else None}
