"""ONNX Runtime peers, each configured as ONNX Runtime's docs recommend for BERT-style models on CPU:

``ort_fp32``          the teacher exported with ``torch.onnx.export`` (TorchScript exporter, dynamic
                      batch and sequence axes, eager attention: the subgraph the optimizer's
                      Attention fusion matches), then ``onnxruntime.transformers.optimizer.optimize_model(
                      model_type='bert', num_heads, hidden_size)`` (fused EmbedLayerNormalization,
                      Attention, SkipLayerNormalization, BiasGelu)
``ort_int8_dynamic``  that optimized graph -> ``quant_pre_process`` (symbolic shape inference) ->
                      ``quantize_dynamic(per_channel=True, weight_type=QInt8)`` (the docs' method for
                      transformer models; QAttention, DynamicQuantizeMatMul)
``ort_int8_static``   the same pre-processed graph -> ``quantize_static`` in QDQ format, S8S8 (the
                      docs' default and first choice), per-channel weights, MinMax calibration over
                      the benchmark's training calibration batches (CalibrationDataReader)

Every session: the documented CPU latency settings (`modeling.onnx_export.RECOMMENDED_SESSION_OPTIONS`:
intra-op threads = the benchmark's threads, 1 inter-op thread, sequential execution, all graph
optimisations). Batch size 1 runs one request at a time on that session (latency). Larger batch
sizes run as ONNX Runtime serves throughput, the counterpart of OpenVINO's THROUGHPUT hint with its
AsyncInferQueue: a second session of the same graph with one intra-op thread, its `Run` called
from `threads` Python threads at once (`InferenceSession.Run` is thread-safe; `modeling.onnx_runtime.concurrent_pass`).
The runtime's own profile (``SessionOptions.enable_profiling``) of one batch gives the executed op types, their counts and time, so a graph whose fusions or integer kernels did not
happen shows it. Artifacts (ONNX files) are written to the benchmark's work folder and reused by
the next system that needs them (setup times say so)."""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

from ltp_compress.manifest import sha256_file
from ltp_compress.modeling.export_format import INTEGER_CONV_OPS, INTEGER_GEMM_OPS
from ltp_compress.pipeline.peers.common import INPUT_NAMES, System, hf_logits_module, load_teacher, numpy_feed, version

DOCS = {
    "session_options": "https://onnxruntime.ai/docs/performance/tune-performance/threading.html",
    "transformer_optimizer": "https://onnxruntime.ai/docs/performance/transformers-optimization.html",
    "quantization": "https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html",
    "profiling": "https://onnxruntime.ai/docs/performance/tune-performance/profiling-tools.html",
    "concurrent_run": "https://github.com/microsoft/onnxruntime/pull/19301 (InferenceSession::Run is guaranteed thread-safe)",
}
#: how an ONNX Runtime system runs a pass above batch size 1 (recorded in its settings)
THROUGHPUT_PASS = ("one session with intra_op_num_threads=1 whose Run is called from `threads` threads at once "
                   "(ThreadPoolExecutor), batches in order; batch size 1: one request at a time on the latency session")
ONNX_OPSET = 17
# ops whose kernel time is the sum of their subgraph's nodes (our export's `If` on the batch size)
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
# op types that do integer work in an ORT CPU graph (GEMMs and convolutions)
INTEGER_OPS = INTEGER_GEMM_OPS + INTEGER_CONV_OPS
FUSED_FP32_OPS = (("Attention", "MultiHeadAttention"), ("SkipLayerNormalization",), ("BiasGelu", "FastGelu", "Gelu"))


def settings_record(threads: int) -> dict:
    from ltp_compress.modeling.onnx_export import RECOMMENDED_SESSION_OPTIONS

    rec = dict(RECOMMENDED_SESSION_OPTIONS)
    rec["intra_op_num_threads"] = int(threads)
    rec["providers"] = ["CPUExecutionProvider"]
    return rec


def open_session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    from ltp_compress.modeling.onnx_runtime import session_options

    try:
        return ort.InferenceSession(str(path), session_options(int(threads), profile_prefix=profile_prefix),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise RuntimeError(f"{path}: onnxruntime cannot load it: {type(e).__name__}: {e}") from None


def op_profile(path: Path, threads: int, feed: dict, work_dir: Path, runs: int = 2) -> dict:
    """ORT's own profile (enable_profiling) of `runs` runs of `feed` on a fresh session of `path`:
    executed node op types with their node-run counts and summed kernel time."""
    prefix = str(work_dir / f"ortprof_{Path(path).stem}_{os.getpid()}")
    sess = open_session(path, threads, prefix)
    names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(runs):
        sess.run(None, feed)
    prof_file = sess.end_profiling()
    try:
        events = json.loads(Path(prof_file).read_text())
    finally:
        Path(prof_file).unlink(missing_ok=True)
    counts: collections.Counter = collections.Counter()
    dur: collections.Counter = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if args.get("op_name") in CONTROL_FLOW_OPS:  # its time is its subgraph's nodes', which are profiled themselves
            continue
        if e.get("cat") == "Node" and "op_name" in args and str(e.get("name", "")).endswith("_kernel_time"):
            counts[args["op_name"]] += 1
            dur[args["op_name"]] += float(e.get("dur", 0))
    total = sum(dur.values())
    return {"tool": "onnxruntime SessionOptions.enable_profiling", "runs": runs,
            "batch_shape": list(next(iter(feed.values())).shape),
            "op_counts_per_run": {k: v // runs for k, v in sorted(counts.items(), key=lambda kv: -dur[kv[0]])},
            "time_fraction_by_op": {k: dur[k] / total for k in sorted(dur, key=lambda k: -dur[k])} if total else {},
            "integer_ops": sorted(k for k in counts if k in INTEGER_OPS)}


def ort_system(path: Path, inp, info: dict) -> System:
    """A System running `path` with the documented session options (batch size 1) and a
    one-thread session called concurrently (larger batch sizes); its op_profile is ORT's."""
    import torch

    from ltp_compress.modeling.onnx_runtime import concurrent_pass

    sess = open_session(path, inp.threads)
    names = tuple(i.name for i in sess.get_inputs())
    out_name = sess.get_outputs()[0].name
    work = Path(inp.work_dir)

    def fn(ids, mask, tt):
        return torch.from_numpy(sess.run([out_name], numpy_feed((ids, mask, tt), names))[0])

    run_pass = None
    if any(b > 1 for b in inp.batches):
        stream_sess = open_session(path, 1)
        run_pass = concurrent_pass(lambda b: torch.from_numpy(stream_sess.run([out_name], numpy_feed(b, names))[0]), inp.threads)
    info = {**info, "session_options": settings_record(inp.threads), "onnxruntime_version": version("onnxruntime"),
            "graph_inputs": list(names)}
    info.setdefault("settings", {})["batch_size_gt_1"] = THROUGHPUT_PASS if run_pass else "one request at a time"
    info.setdefault("docs", []).append(DOCS["concurrent_run"])
    info.setdefault("artifacts", {})[path.name] = {"path": str(path), "sha256": sha256_file(path)}
    return System(fn, info, run_pass=run_pass, op_profile=lambda batch: op_profile(path, inp.threads, numpy_feed(batch, names), work))


# ----------------------------------------------------------------------------- artifacts


def _cached(path: Path, build, notes: list) -> Path:
    """Build `path` unless an earlier system of this benchmark already did (in the work folder)."""
    if path.is_file():
        notes.append(f"{path.name} reused from the benchmark work folder (built by an earlier system)")
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    t0 = time.perf_counter()
    build(tmp)
    os.replace(tmp, path)
    notes.append(f"{path.name} built in {time.perf_counter() - t0:.1f} s")
    return path


def export_teacher(inp, notes: list) -> tuple[Path, dict]:
    """The FP32 teacher as ONNX: TorchScript exporter, dynamic batch / sequence axes."""
    import torch

    work = Path(inp.work_dir)
    model = load_teacher(inp, "eager")
    cfg = {"num_heads": int(model.config.num_attention_heads), "hidden_size": int(model.config.hidden_size),
           "model_type": model.config.model_type}

    def build(tmp: Path):
        import warnings

        first = inp.calibration[0]
        args = (first.input_ids[:2], first.attention_mask[:2], first.token_type_ids[:2])
        dyn = {k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(hf_logits_module(model), args, str(tmp), input_names=list(INPUT_NAMES), output_names=["logits"],
                              dynamic_axes={**dyn, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False)

    return _cached(work / "teacher_fp32.onnx", build, notes), cfg


def optimized_teacher(inp, notes: list) -> tuple[Path, dict]:
    """`export_teacher` -> onnxruntime.transformers.optimizer.optimize_model(model_type='bert')."""
    raw, cfg = export_teacher(inp, notes)
    stats: dict = {}
    stats_file = Path(inp.work_dir) / "teacher_fp32_opt.fusions.json"

    def build(tmp: Path):
        from onnxruntime.transformers import optimizer

        om = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg["num_heads"], hidden_size=cfg["hidden_size"])
        stats_file.write_text(json.dumps({k: int(v) for k, v in om.get_fused_operator_statistics().items() if v}))
        om.save_model_to_file(str(tmp))

    path = _cached(Path(inp.work_dir) / "teacher_fp32_opt.onnx", build, notes)
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
    return path, {**cfg, "fused_operator_statistics": stats}


def preprocessed_teacher(inp, notes: list) -> tuple[Path, dict]:
    """The optimized graph after `quant_pre_process` (symbolic shape inference; ORT optimisation
    skipped: the transformer optimizer already ran), the input the quantizers expect."""
    opt, cfg = optimized_teacher(inp, notes)

    def build(tmp: Path):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(opt), str(tmp), skip_optimization=True)

    return _cached(Path(inp.work_dir) / "teacher_fp32_opt_pre.onnx", build, notes), cfg


# ----------------------------------------------------------------------------- systems


def build_ort_fp32(inp) -> System:
    notes: list = []
    path, cfg = optimized_teacher(inp, notes)
    return ort_system(path, inp, {
        "api": "torch.onnx.export(dynamo=False, dynamic_axes) -> onnxruntime.transformers.optimizer.optimize_model("
               f"model_type='bert', num_heads={cfg['num_heads']}, hidden_size={cfg['hidden_size']}) -> InferenceSession",
        "settings": {"export": {"exporter": "torch.onnx.export(dynamo=False)", "opset": ONNX_OPSET,
                                "dynamic_axes": "batch, sequence", "attn_implementation": "eager"},
                     "optimizer": {"model_type": "bert", "num_heads": cfg["num_heads"], "hidden_size": cfg["hidden_size"],
                                   "opt_level": "None (the default for model_type bert: 1, ORT basic optimisations then the Python fusions)",
                                   "use_gpu": False},
                     "fused_operator_statistics": cfg["fused_operator_statistics"]},
        "docs": [DOCS["transformer_optimizer"], DOCS["session_options"]], "notes": notes})


def build_ort_int8_dynamic(inp) -> System:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    notes: list = []
    pre, cfg = preprocessed_teacher(inp, notes)
    path = _cached(Path(inp.work_dir) / "teacher_int8_dynamic.onnx",
                   lambda tmp: quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, per_channel=True), notes)
    return ort_system(path, inp, {
        "api": "optimize_model(model_type='bert') -> quant_pre_process(skip_optimization=True) -> "
               "quantize_dynamic(weight_type=QInt8, per_channel=True)",
        "settings": {"quantize_dynamic": {"weight_type": "QInt8", "per_channel": True, "reduce_range": False,
                                          "op_types_to_quantize": "all supported"},
                     "reduce_range_reason": "False: the docs advise reduce_range only on CPUs without VNNI",
                     "pre_process": "quant_pre_process(skip_optimization=True)",
                     "fused_operator_statistics": cfg["fused_operator_statistics"]},
        "docs": [DOCS["quantization"], DOCS["transformer_optimizer"], DOCS["session_options"]], "notes": notes})


class _CalibrationReader:
    """onnxruntime.quantization.CalibrationDataReader over the benchmark's calibration batches."""

    def __init__(self, batches, names):
        self._it = iter([numpy_feed(b, names) for b in batches])

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):  # CalibrationDataReader protocol in recent ORT versions
        return self

    def __next__(self):
        r = self.get_next()
        if r is None:
            raise StopIteration
        return r


def build_ort_int8_static(inp) -> System:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    notes: list = []
    pre, cfg = preprocessed_teacher(inp, notes)
    names = tuple(i.name for i in onnx.load(str(pre), load_external_data=False).graph.input)

    class Reader(_CalibrationReader, CalibrationDataReader):
        pass

    def build(tmp: Path):
        quantize_static(str(pre), str(tmp), Reader(inp.calibration, names), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)

    path = _cached(Path(inp.work_dir) / "teacher_int8_static_qdq.onnx", build, notes)
    return ort_system(path, inp, {
        "api": "optimize_model(model_type='bert') -> quant_pre_process(skip_optimization=True) -> quantize_static("
               "CalibrationDataReader(training batches), quant_format=QDQ, activation_type=QInt8, weight_type=QInt8, "
               "per_channel=True, calibrate_method=MinMax)",
        "settings": {"quantize_static": {"quant_format": "QDQ", "activation_type": "QInt8", "weight_type": "QInt8",
                                         "per_channel": True, "calibrate_method": "MinMax", "reduce_range": False,
                                         "calibration": f"{len(inp.calibration)} batches: {inp.calibration_source}"},
                     "why": "the docs: S8S8 in QDQ format is the default and the first choice on CPU; MinMax is "
                            "quantize_static's default calibration; the docs recommend dynamic quantization for "
                            "transformers, so this static system is the calibrated alternative",
                     "fused_operator_statistics": cfg["fused_operator_statistics"]},
        "docs": [DOCS["quantization"], DOCS["session_options"]], "notes": notes})
