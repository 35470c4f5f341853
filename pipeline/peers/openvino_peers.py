"""OpenVINO peers, configured as OpenVINO's and NNCF's docs recommend:

``openvino_fp32``  ``ov.convert_model(HF model (default sdpa attention), example_input=a calibration
                   batch)`` (dynamic batch and sequence dims) compiled for CPU with
                   ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO's default on a bf16-capable CPU is bf16:
                   recorded as `default_inference_precision`)
``openvino_int8``  that model -> ``nncf.quantize(model, nncf.Dataset(single unpadded training examples),
                   model_type=nncf.ModelType.TRANSFORMER, subset_size=300)`` (preset left at its default,
                   which NNCF documents as MIXED for transformer models), compiled with the
                   default inference precision (float layers left after quantisation may run in bf16)

Both with ``INFERENCE_NUM_THREADS`` = the benchmark's threads and the documented performance hints:
``PERFORMANCE_HINT=LATENCY`` for batch size 1 (one request at a time), ``THROUGHPUT`` for larger
batch sizes, where a pass runs as OpenVINO documents throughput mode: an ``AsyncInferQueue`` with
``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` jobs, one batch per request. The compiled models' properties are
read back into the settings. The profile is OpenVINO's runtime model (``get_runtime_model()``:
executed layer types and their runtime precision, u8/i8 FullyConnected for INT8) plus per-layer
perf counts (``PERF_COUNT``) of one batch."""

from __future__ import annotations

import collections
import time
from pathlib import Path

from ltp_compress.pipeline.peers.common import System, load_teacher, numpy_feed, version

DOCS = {
    "performance_hints": "https://docs.openvino.ai/2025/openvino-workflow/running-inference/optimize-inference/high-level-performance-hints.html",
    "threads": "https://docs.openvino.ai/2025/openvino-workflow/running-inference/inference-devices-and-modes/cpu-device/performance-hint-and-thread-scheduling.html",
    "precision": "https://docs.openvino.ai/2025/openvino-workflow/running-inference/optimize-inference/precision-control.html",
    "convert_pytorch": "https://docs.openvino.ai/2025/openvino-workflow/model-preparation/convert-model-pytorch.html",
    "nncf_ptq": "https://docs.openvino.ai/2025/openvino-workflow/model-optimization-guide/quantizing-models-post-training/basic-quantization-flow.html",
    "nncf_api": "https://openvinotoolkit.github.io/nncf/autoapi/nncf/index.html#nncf.quantize",
    "throughput_async": "https://docs.openvino.ai/2025/openvino-workflow/running-inference/optimize-inference/optimizing-throughput.html",
}
READ_BACK = ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS",
             "OPTIMAL_NUMBER_OF_INFER_REQUESTS", "EXECUTION_MODE_HINT", "PERF_COUNT")
INTEGER_PRECISIONS = ("u8", "i8")


def _prop(cm, key):
    try:
        return str(cm.get_property(key))
    except Exception as e:
        return f"unavailable: {type(e).__name__}"


NNCF_SUBSET_SIZE = 300  # nncf.quantize's default and the docs' "for example, of 300 samples"


def per_example_feeds(batches, names) -> list[dict]:
    """Each calibration example on its own, padding removed (batch 1 items)."""
    out = []
    for b in batches:
        feed = numpy_feed(b, names)
        lengths = b.attention_mask.sum(1).tolist()
        for r, n in enumerate(lengths):
            out.append({k: v[r:r + 1, :int(n)] for k, v in feed.items()})
    return out


def _convert(inp, notes: list):
    """The teacher as an OpenVINO model (``ov.convert_model`` from the HF model), saved as FP32 IR in
    the benchmark's work folder so the next OpenVINO system reads it instead of converting again."""
    import openvino as ov
    import torch

    xml = Path(inp.work_dir) / "teacher_fp32_ov.xml" if inp.work_dir else None
    if xml is not None and xml.is_file():
        notes.append(f"{xml.name} reused from the benchmark work folder (converted by an earlier system)")
        return ov.Core().read_model(str(xml))
    model = load_teacher(inp, "sdpa")
    first = inp.calibration[0]
    example = {"input_ids": first.input_ids, "attention_mask": first.attention_mask, "token_type_ids": first.token_type_ids}
    t0 = time.perf_counter()
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=example)
    notes.append(f"converted in {time.perf_counter() - t0:.1f} s")
    if xml is not None:
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # FP32 weights kept as they are
    return ov_model


def runtime_precisions(compiled) -> dict:
    """{"LayerType/precision": count} over the compiled model's executed (runtime) graph."""
    c: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        ri = op.get_rt_info()
        lt = ri["layerType"].astype(str) if "layerType" in ri else op.get_type_name()
        pr = ri["runtimePrecision"].astype(str) if "runtimePrecision" in ri else "?"
        c[f"{lt}/{pr}"] += 1
    return dict(sorted(c.items()))


def _perf_counts(ov_model, config: dict, feed: dict) -> dict:
    import openvino as ov

    cm = ov.Core().compile_model(ov_model, "CPU", {**config, "PERF_COUNT": True})
    req = cm.create_infer_request()
    req.infer(feed)
    req.infer(feed)
    by: collections.Counter = collections.Counter()
    n: collections.Counter = collections.Counter()
    for p in req.get_profiling_info():
        if str(p.status).endswith("EXECUTED"):
            key = f"{p.node_type}/{p.exec_type}"
            by[key] += p.real_time.total_seconds() if hasattr(p.real_time, "total_seconds") else float(p.real_time)
            n[key] += 1
    total = sum(by.values())
    return {"layers_by_type_exec": dict(sorted(n.items())),
            "time_fraction_by_type_exec": {k: by[k] / total for k in sorted(by, key=lambda k: -by[k])} if total else {}}


def _system(ov_model, inp, base_cfg: dict, info: dict) -> System:
    import openvino as ov

    import torch

    core = ov.Core()
    default_precision = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    lat_cfg = {**base_cfg, "PERFORMANCE_HINT": "LATENCY"}
    tput_cfg = {**base_cfg, "PERFORMANCE_HINT": "THROUGHPUT"}
    t0 = time.perf_counter()
    lat = core.compile_model(ov_model, "CPU", lat_cfg)
    tput = core.compile_model(ov_model, "CPU", tput_cfg) if any(b > 1 for b in inp.batches) else None
    compile_s = time.perf_counter() - t0
    names = tuple(i.get_any_name() for i in ov_model.inputs)
    lat_req = lat.create_infer_request()
    queue = None
    if tput is not None:
        jobs = int(tput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue = ov.AsyncInferQueue(tput, jobs)

    def fn(ids, mask, tt):
        res = lat_req.infer(numpy_feed((ids, mask, tt), names))
        return torch.from_numpy(next(iter(res.values())).copy())

    def run_pass(batches):
        outs = [None] * len(batches)

        def done(req, idx):
            outs[idx] = torch.from_numpy(req.get_output_tensor(0).data.copy())
        queue.set_callback(done)
        for i, b in enumerate(batches):
            queue.start_async(numpy_feed(b, names), i)
        queue.wait_all()
        return outs

    def op_profile(batch):
        cm = lat if len(batch) == 1 or tput is None else tput
        return {"tool": "openvino compiled_model.get_runtime_model() rt_info (layerType/runtimePrecision) + PERF_COUNT",
                "runtime_layers": runtime_precisions(cm),
                "perf_counts": _perf_counts(ov_model, lat_cfg, numpy_feed(batch, names)),
                "integer_ops": sorted(k for k in runtime_precisions(cm)
                                      if k.split("/")[-1] in INTEGER_PRECISIONS and k.split("/")[0] in ("FullyConnected", "MatMul"))}

    settings = {"batch_size_1": {"requested": lat_cfg, "compiled": {k: _prop(lat, k) for k in READ_BACK}}}
    if tput is not None:
        settings["batch_size_gt_1"] = {"requested": tput_cfg, "compiled": {k: _prop(tput, k) for k in READ_BACK},
                                       "pass": f"AsyncInferQueue({int(tput.get_property('OPTIMAL_NUMBER_OF_INFER_REQUESTS'))} jobs), one batch per request"}
    info = {**info, "settings": {**info.get("settings", {}), **settings},
            "default_inference_precision": default_precision, "compile_s": compile_s,
            "openvino_version": version("openvino"), "nncf_version": version("nncf")}
    return System(fn, info, run_pass=run_pass if queue is not None else None, op_profile=op_profile)


def build_openvino_fp32(inp) -> System:
    notes: list = []
    ov_model = _convert(inp, notes)
    return _system(ov_model, inp, {"INFERENCE_NUM_THREADS": int(inp.threads), "INFERENCE_PRECISION_HINT": "f32"}, {
        "api": "ov.convert_model(HF model, example_input) -> Core().compile_model('CPU', {PERFORMANCE_HINT, "
               "INFERENCE_NUM_THREADS, INFERENCE_PRECISION_HINT='f32'})",
        "docs": [DOCS["convert_pytorch"], DOCS["performance_hints"], DOCS["threads"], DOCS["precision"], DOCS["throughput_async"]],
        "notes": notes})


def build_openvino_default(inp) -> System:
    """OpenVINO as a user gets it: no INFERENCE_PRECISION_HINT, so the CPU plugin's default
    precision (bf16 on CPUs with AMX / AVX-512 BF16, f32 otherwise; recorded in the settings)."""
    notes: list = []
    ov_model = _convert(inp, notes)
    return _system(ov_model, inp, {"INFERENCE_NUM_THREADS": int(inp.threads)}, {
        "api": "ov.convert_model(HF model, example_input) -> Core().compile_model('CPU', {PERFORMANCE_HINT, "
               "INFERENCE_NUM_THREADS}): the default inference precision",
        "docs": [DOCS["convert_pytorch"], DOCS["performance_hints"], DOCS["threads"], DOCS["precision"], DOCS["throughput_async"]],
        "notes": notes})


def build_openvino_int8(inp) -> System:
    import nncf

    notes: list = []
    ov_model = _convert(inp, notes)
    names = tuple(i.get_any_name() for i in ov_model.inputs)
    data = per_example_feeds(inp.calibration, names)
    subset = min(NNCF_SUBSET_SIZE, len(data))
    t0 = time.perf_counter()
    q = nncf.quantize(ov_model, nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER, subset_size=subset)
    quant_s = time.perf_counter() - t0
    return _system(q, inp, {"INFERENCE_NUM_THREADS": int(inp.threads)}, {
        "api": "ov.convert_model(HF model, example_input) -> nncf.quantize(model, nncf.Dataset(calibration feeds), "
               "model_type=nncf.ModelType.TRANSFORMER, subset_size=min(300, examples)) -> Core().compile_model('CPU', "
               "{PERFORMANCE_HINT, INFERENCE_NUM_THREADS})",
        "settings": {"nncf_quantize": {"model_type": "TRANSFORMER", "preset": "default (MIXED for TRANSFORMER, per NNCF docs)",
                                       "subset_size": subset,
                                       "calibration": f"{len(data)} single unpadded examples (batch 1, as in NNCF's examples) "
                                                      f"cut from {inp.calibration_source}"},
                     "inference_precision": "default (not set): float layers left after quantisation may run in bf16"},
        "quantize_s": quant_s, "notes": notes,
        "docs": [DOCS["nncf_ptq"], DOCS["nncf_api"], DOCS["convert_pytorch"], DOCS["performance_hints"], DOCS["threads"],
                 DOCS["precision"], DOCS["throughput_async"]]})
