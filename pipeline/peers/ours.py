"""Our systems, on each runtime:

``ltp_fp32``        the hard-pruned FP model, ``forward_packed`` (token removal), torch
``dense_int8``      the teacher quantised in-process by our pipeline (``calibrate`` +
                    ``convert_to_int8``, pruning none), packed torch runtime
``ltp_int8``        the deployable INT8 checkpoint (``load_deployable``): token removal + INT8 GEMMs, torch
``ltp_int8_ort``    that checkpoint exported by ``modeling.onnx_export.export_onnx`` (pruning in the
                    graph), run by ``modeling.onnx_runtime.load_onnx`` (ONNX Runtime)
``dense_int8_ort``  ``dense_int8`` saved as a deployable checkpoint (``save_deployable``) and exported
                    the same way: the dense INT8 graph on ONNX Runtime
"""

from __future__ import annotations

from pathlib import Path

from ltp_compress.manifest import sha256_file
from ltp_compress.pipeline.peers.common import BenchError, System, checkpoint_identity, load_teacher, numpy_feed


def build_ltp_fp32(inp) -> System:
    from ltp_compress.modeling.model_io import load_stage_model
    from ltp_compress.modeling.pruned_encoder import forward_packed
    from ltp_compress.tasks.glue import get_task

    if not inp.models.get("hard"):
        raise BenchError("no hard-pruned FP model available (pass a run directory with an ltp_hard stage or --hard)")
    model, _, pruning = load_stage_model(Path(inp.models["hard"]), get_task(inp.task))
    model.eval()
    return System(lambda i, m, t: forward_packed(model, i, m, t, pruning).logits,
                  {"api": "forward_packed(hard model, PruningConfig from pruning.json)", "pruning": pruning.to_dict(),
                   "settings": {"runtime": "torch eager, packed token layout", "torch_threads": inp.threads},
                   "_model": model}, kept_tokens=_torch_kept(model, pruning))


def _torch_kept(model, pruning):
    """kept_tokens(batch) for a torch system: forward_packed's own count of the tokens entering each layer."""
    from ltp_compress.modeling.pruned_encoder import forward_packed

    def kept(batch):
        out = forward_packed(model, batch.input_ids, batch.attention_mask, batch.token_type_ids, pruning, return_kept=True)
        return out.kept_tokens.cpu().numpy()
    return kept


def _dense_qmodel(inp):
    from ltp_compress.modeling.pruned_encoder import PruningConfig
    from ltp_compress.modeling.quantized import calibrate, convert_to_int8

    teacher = load_teacher(inp)
    none = PruningConfig()
    scales = calibrate(teacher, inp.calibration, none, inp.quant.get("observer", "minmax"), inp.quant.get("percentile") or 99.99)
    qmodel, info = convert_to_int8(teacher, scales, inp.backend, fuse_gelu=inp.quant.get("fuse_gelu", True))
    return qmodel, info, none


def build_dense_int8(inp) -> System:
    from ltp_compress.modeling.pruned_encoder import forward_packed

    qmodel, info, none = _dense_qmodel(inp)
    return System(lambda i, m, t: forward_packed(qmodel, i, m, t, none).logits,
                  {"api": "calibrate(teacher, calib, PruningConfig()) + convert_to_int8(backend) + forward_packed(pruning none)",
                   "backend": info.backend, "observer": inp.quant.get("observer", "minmax"),
                   "percentile": inp.quant.get("percentile"), "fused_gelu_layers": len(info.fused_gelu),
                   "settings": {"runtime": "torch eager, packed token layout", "backend": info.backend,
                                "observer": inp.quant.get("observer", "minmax"), "torch_threads": inp.threads},
                   "_model": qmodel}, kept_tokens=_torch_kept(qmodel, none))


def build_ltp_int8(inp) -> System:
    from ltp_compress.modeling.deploy import load_deployable
    from ltp_compress.modeling.pruned_encoder import forward_packed

    if not inp.models.get("int8"):
        raise BenchError("no deployable INT8 checkpoint available")
    dm = load_deployable(inp.models["int8"], inp.backend)
    pruning = dm.pruning
    return System(lambda i, m, t: forward_packed(dm.model, i, m, t, pruning).logits,
                  {"api": "load_deployable(path, backend) -> forward_packed(model, ..., pruning)", "backend": dm.backend,
                   "pruning": pruning.to_dict(), "load_notes": dm.notes,
                   "settings": {"runtime": "torch eager, packed token layout", "backend": dm.backend, "torch_threads": inp.threads},
                   "_model": dm.model}, kept_tokens=_torch_kept(dm.model, pruning))


def _dense_int8_checkpoint(inp, notes: list) -> Path:
    """dense_int8's model as a deployable checkpoint (pruning none) in the work folder, built once."""
    from ltp_compress.modeling.deploy import save_deployable
    from ltp_compress.modeling.model_io import load_tokenizer

    ckpt = Path(inp.work_dir) / "dense_int8_ckpt"
    if not ckpt.is_dir():
        qmodel, info, none = _dense_qmodel(inp)
        save_deployable(qmodel, load_tokenizer(inp.models["teacher"]), none, info, ckpt, max_seq_length=inp.max_seq_length)
    else:
        notes.append(f"{ckpt.name} reused from the benchmark work folder")
    return ckpt


def build_ltp_int8_fused(inp) -> System:
    if not inp.models.get("int8"):
        raise BenchError("no deployable INT8 checkpoint available")
    return _fused_system(inp.models["int8"], inp, [])


def build_dense_int8_fused(inp) -> System:
    notes: list = []
    return _fused_system(_dense_int8_checkpoint(inp, notes), inp, notes)


def _fused_system(checkpoint, inp, notes: list) -> System:
    from ltp_compress.kernels import fused_encoder
    from ltp_compress.modeling.fused_runtime import load_fused

    reason = fused_encoder.available()
    if reason is not None:
        raise BenchError(f"the fused runtime is not available here: {reason}")
    dm = load_fused(checkpoint, threads=inp.threads)

    def fn(ids, mask, tt):
        return dm.logits({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})

    run_pass = None
    if any(b > 1 for b in inp.batches) and inp.threads > 1:  # the throughput setting, as our ORT system runs bs > 1
        dm_streams = load_fused(checkpoint, threads=inp.threads, streams=inp.threads)
        run_pass = dm_streams.logits_many  # batches with input_ids / attention_mask / token_type_ids

    def kept(batch):  # the tokens entering each layer as the extension ran this batch
        fn(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return dm.last_kept_tokens.cpu().numpy()

    return System(fn, {"api": "ltp_compress.load(path, runtime='fused') -> logits(batch): one call into the extension per batch",
                       "backend": dm.backend, "kernel_path": dm.kernel_path(), "pruning": dm.pruning.to_dict(),
                       "settings": {"runtime": "fused C++ extension (kernels/fused), packed token layout", "kernel": dm.kernel_path(),
                                    "threads": inp.threads,
                                    "batch_size_gt_1": (f"load_fused(streams={inp.threads}): {inp.threads} batches at once, "
                                                        "1 thread each" if run_pass else "one request at a time")},
                       "notes": notes}, run_pass=run_pass, kept_tokens=kept, last_layer_rows=dm.last_layer_rows)


def _onnx_system(export_dir: Path, inp, info: dict) -> System:
    """Our export folder on ONNX Runtime (load_onnx: manifest verified, documented session options)."""
    import torch

    from ltp_compress.modeling.onnx_export import ONNX_FILE
    from ltp_compress.modeling.onnx_runtime import load_onnx
    from ltp_compress.pipeline.peers.onnxruntime_peers import THROUGHPUT_PASS, op_profile, settings_record

    dm = load_onnx(export_dir, threads=inp.threads)
    names = tuple(i.name for i in dm.session.get_inputs())

    def fn(ids, mask, tt):
        return torch.from_numpy(dm.logits(numpy_feed((ids, mask, tt), names)))

    run_pass = None
    if any(b > 1 for b in inp.batches):  # the throughput setting, as every ORT system runs bs > 1
        dm_streams = load_onnx(export_dir, threads=inp.threads, streams=inp.threads)
        run_pass = lambda batches: [torch.from_numpy(x) for x in dm_streams.logits_many([numpy_feed(b, names) for b in batches])]  # noqa: E731
    info = {**info, "backend": dm.backend, "session_options": settings_record(inp.threads),
            "export": checkpoint_identity(export_dir), "onnx_sha256": sha256_file(export_dir / ONNX_FILE),
            "export_parity": _parity(export_dir)}
    def profile(batch):
        prof = op_profile(export_dir / ONNX_FILE, inp.threads, numpy_feed(batch, names), Path(inp.work_dir))
        by: dict = {}
        for op, frac in prof["time_fraction_by_op"].items():
            cls = next((c for c, ops in ORT_OP_CLASSES.items() if op in ops), "other")
            by[cls] = by.get(cls, 0.0) + frac
        prof["time_fraction_by_class"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        prof["op_classes"] = {c: list(ops) for c, ops in ORT_OP_CLASSES.items()}
        return prof

    def kept(batch):  # the graph's own `kept_tokens` output
        dm.logits(numpy_feed((batch.input_ids, batch.attention_mask, batch.token_type_ids), names))
        return dm.last_kept_tokens

    info.setdefault("settings", {})["batch_size_gt_1"] = (f"load_onnx(streams={inp.threads}): " + THROUGHPUT_PASS) if run_pass \
        else "one request at a time"
    return System(fn, info, run_pass=run_pass, op_profile=profile, kept_tokens=kept)


# op-class profile of our exported graph on ONNX Runtime (op types as ORT's profile names them after its own
# fusions); an op type used in several places (Mul, Add, Where) counts for its dominant use: approximate
ORT_OP_CLASSES = {
    "int8_linear": ("MatMulIntegerToFloat", "MatMulInteger", "QuantizeLinear", "DynamicQuantizeLinear", "Max"),
    "attention_matmul_softmax": ("FusedMatMul", "MatMul", "Softmax", "Transpose", "Where", "Mul", "Div"),
    "layernorm_gelu": ("LayerNormalization", "SkipLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "Add"),
    "token_scoring_select_gather": ("ReduceSum", "ReduceMax", "Greater", "Less", "Equal", "Not", "And", "Or", "NonZero",
                                    "Compress", "Gather", "GatherND", "GatherElements", "ScatterND", "CumSum", "TopK"),
    "shape_glue": ("Reshape", "Unsqueeze", "Squeeze", "Concat", "Shape", "Range", "ConstantOfShape", "Cast", "Sub",
                   "Expand", "Slice"),
}


def _parity(export_dir: Path):
    import json

    from ltp_compress.manifest import MANIFEST_FILE

    try:
        return json.loads((export_dir / MANIFEST_FILE).read_text()).get("parity")
    except (OSError, ValueError) as e:
        return f"{export_dir / MANIFEST_FILE}: unreadable: {e}"


def _export(ckpt: Path, out: Path, notes: list) -> Path:
    """Always a fresh export (seconds; replaces `out` atomically): an export left in the work folder
    by an older graph builder would otherwise be timed as if it were this code's."""
    from ltp_compress.modeling.onnx_export import export_onnx

    export_onnx(ckpt, out)
    notes.append(f"{out.name} exported by this run")
    return out


def build_ltp_int8_ort(inp) -> System:
    if not inp.models.get("int8"):
        raise BenchError("no deployable INT8 checkpoint available")
    notes: list = []
    out = _export(Path(inp.models["int8"]), Path(inp.work_dir) / "ltp_int8_onnx", notes)
    return _onnx_system(out, inp, {
        "api": "modeling.onnx_export.export_onnx(int8 checkpoint) -> modeling.onnx_runtime.load_onnx(threads) "
               "(token pruning in the graph, MatMulIntegerToFloat with the checkpoint's scales)",
        "settings": {"runtime": "onnxruntime"}, "notes": notes,
        "docs": ["https://onnxruntime.ai/docs/performance/tune-performance/threading.html"]})


def build_dense_int8_ort(inp) -> System:
    notes: list = []
    ckpt = _dense_int8_checkpoint(inp, notes)
    out = _export(ckpt, Path(inp.work_dir) / "dense_int8_onnx", notes)
    return _onnx_system(out, inp, {
        "api": "dense_int8's model -> save_deployable(pruning none) -> export_onnx -> load_onnx(threads)",
        "settings": {"runtime": "onnxruntime", "observer": inp.quant.get("observer", "minmax")}, "notes": notes,
        "docs": ["https://onnxruntime.ai/docs/performance/tune-performance/threading.html"]})
