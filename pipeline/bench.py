"""End-to-end inference benchmark: our pruned / INT8 runtimes vs HF FP32 and dense INT8 peers.

Every system runs on the SAME tokenised dev examples, cut into the SAME length-bucketed,
dynamically padded batches (each batch padded to its own longest row; `length_bucketed_batches`
with shuffle off), with ``torch.set_num_threads(threads)``:

=============================  ==============================================================
``hf_fp32_eager``              the FP teacher as a Hugging Face model, eager attention, dense
``torch_dynamic_int8``         ``torch.ao.quantization.quantize_dynamic(teacher, {nn.Linear},
                               dtype=torch.qint8)`` (dynamic activation scales), eager
``inc_static_int8``            Intel Neural Compressor 3.x PT2E static INT8:
                               ``neural_compressor.torch.export.export`` (dynamic batch / seq
                               dims) -> ``prepare(get_default_static_config())`` -> calibrate ->
                               ``convert`` -> ``torch.compile(dynamic=True)``
``torchao_static_int8_compiled``  torchao ``Int8StaticActivationInt8WeightConfig`` (per-tensor
                               symmetric static activation scale per Linear from our calibration
                               pass, per-row int8 weights) -> ``torch.compile(dynamic=True)``
``ltp_fp32``                   ours: the hard-pruned FP model, ``forward_packed`` (token removal)
``dense_int8``                 ours: the teacher quantised in-process by our pipeline
                               (``calibrate`` + ``convert_to_int8``, pruning none), packed runtime
``ltp_int8``                   ours: the deployable INT8 checkpoint (``load_deployable``): token
                               removal + INT8 GEMMs
=============================  ==============================================================

Per system: accuracy (task metrics via ``compute_metrics``) on the benchmarked examples, throughput
(examples/s, median of ``repeats`` timed passes after one warmup pass) per batch size, bs-1 latency
p50/p95, peak RSS, setup (load / quantise / export) and warmup (incl. compilation) time, and the
throughput ratios vs ``hf_fp32_eager`` and vs the best dense INT8 peer (the fastest of the three
third-party INT8 systems at that batch size). A failing system is recorded with its error, never
dropped. ``ltp_int8`` also gets a profile at bs 32 (time per op class, effective GOP/s of the INT8
GEMMs inside the model vs a standalone GEMM rate).

Isolation: by default each system runs in its own ``multiprocessing`` *spawn* child (fresh
interpreter, the same pickled batches), so its peak RSS (``ru_maxrss``) is its own;
``isolation="inprocess"`` runs everything in this process and reports VmRSS growth instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ltp_compress.errors import UserError
from ltp_compress.manifest import MANIFEST_FILE
from ltp_compress.modeling.checkpoint_format import read_deployable_info
from ltp_compress.pipeline.run_dir import RunDir

from ltp_compress.pipeline.bench_args import BASELINE, INT8_PEERS, OURS, SYSTEMS  # noqa: F401 (re-exported)
NEEDS = {  # which model each system is built from
    "hf_fp32_eager": "teacher", "torch_dynamic_int8": "teacher", "inc_static_int8": "teacher",
    "torchao_static_int8_compiled": "teacher", "dense_int8": "teacher", "ltp_fp32": "hard", "ltp_int8": "int8",
}
DESCRIPTIONS = {
    "hf_fp32_eager": "HF model, FP32, eager attention, dense",
    "torch_dynamic_int8": "torch.ao quantize_dynamic (Linear, qint8, dynamic activations), eager",
    "inc_static_int8": "Neural Compressor PT2E static INT8 + torch.compile",
    "torchao_static_int8_compiled": "torchao Int8StaticActivationInt8WeightConfig + torch.compile",
    "ltp_fp32": "ours: hard-pruned FP32, packed token-removing runtime",
    "dense_int8": "ours: teacher, static W8A8 (our calibrate + convert_to_int8), packed runtime, no pruning",
    "ltp_int8": "ours: deployable checkpoint, token removal + INT8 GEMMs",
}


class BenchError(UserError, ValueError):
    """Bad benchmark arguments (missing checkpoint / stage, unknown system)."""


# ----------------------------------------------------------------------------- locating models


def resolve_models(checkpoint: str | Path | None = None, *, run_dir: str | Path | None = None,
                   teacher: str | Path | None = None, hard: str | Path | None = None,
                   int8: str | Path | None = None) -> dict:
    """{"teacher": path|None, "hard": path|None, "int8": path|None, "int8_stage": meta|None,
    "run_dir": path|None, "notes": [...]}.

    `checkpoint` may be a run directory (has stages/) or a deployable INT8 folder (has
    manifest.json); a deployable folder inside a run (runs/X/stages/NN-id/model) also finds its
    run's teacher and hard stages. In a run: teacher = the first ``finetune`` stage, hard = the
    last ``ltp_hard`` stage, int8 = the first ``quantize`` stage (explicit paths win)."""
    notes: list[str] = []
    paths = {"teacher": None, "hard": None, "int8": None}
    int8_meta = None
    if checkpoint is not None:
        cp = Path(checkpoint)
        if not cp.exists():
            raise BenchError(f"{cp}: not found (expected a run directory or a deployable INT8 checkpoint folder)")
        if (cp / MANIFEST_FILE).is_file():
            paths["int8"] = cp
            containing = RunDir.containing_model(cp)
            if run_dir is None and containing is not None:
                run_dir = containing.path
                notes.append(f"checkpoint is a stage of run {run_dir}: teacher / hard models taken from that run")
            elif run_dir is None:
                notes.append("checkpoint is a standalone deployable folder: no teacher / hard model, only ltp_int8 can run")
        elif RunDir(cp).is_run():
            run_dir = cp
        else:
            raise BenchError(f"{cp}: neither a run directory (recipe.json, stages/) nor a deployable checkpoint ({MANIFEST_FILE})")
    if run_dir is not None:
        run = RunDir(Path(run_dir))
        records = run.finished()
        if not records:
            raise BenchError(f"{run.path}: no finished stages")
        ft = [r for r in records if r.stage == "finetune" and r.model_dir is not None]
        hd = [r for r in records if r.stage == "ltp_hard" and r.model_dir is not None]
        qz = [r for r in records if r.stage == "quantize" and r.model_dir is not None and (r.model_dir / MANIFEST_FILE).is_file()]
        if paths["teacher"] is None and ft:
            paths["teacher"] = ft[0].model_dir
        if paths["hard"] is None and hd:
            paths["hard"] = hd[-1].model_dir
        if paths["int8"] is None and qz:
            paths["int8"], int8_meta = qz[0].model_dir, qz[0].meta
        elif paths["int8"] is not None:
            for r in qz:
                if r.model_dir.resolve() == Path(paths["int8"]).resolve():
                    int8_meta = r.meta
    for k, v in (("teacher", teacher), ("hard", hard), ("int8", int8)):
        if v is not None:
            paths[k] = Path(v)
    return {**{k: (str(v) if v else None) for k, v in paths.items()}, "int8_stage": int8_meta,
            "run_dir": str(run_dir) if run_dir else None, "notes": notes}


# ----------------------------------------------------------------------------- inputs


@dataclass
class BenchInputs:
    """Everything a system run needs; picklable (sent to spawn children)."""

    task: str
    models: dict
    batches: dict  # bs -> list[Batch]
    calibration: list  # list[Batch]
    calibration_source: str
    labels: list
    threads: int
    repeats: int
    max_seq_length: int
    pad_token_id: int
    quant: dict  # observer / percentile for dense_int8 (from the run's quantize stage)
    backend: str = "auto"
    profile_bs: int | None = 32
    gemm_bench_json: str | None = None
    extra: dict = field(default_factory=dict)


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / (1024.0 * 1024.0)


# ----------------------------------------------------------------------------- systems


class System:
    """A built system: `logits(batch) -> FloatTensor [b, num_labels]`."""

    def __init__(self, fn, info: dict | None = None, pad_multiple: int | None = None):
        self.fn = fn
        self.info = info or {}
        self.pad_multiple = pad_multiple

    def logits(self, batch):
        ids, mask, tt = batch.input_ids, batch.attention_mask, batch.token_type_ids
        if self.pad_multiple:
            ids, mask, tt = _pad_to_multiple(ids, mask, tt, self.pad_multiple, self.info.get("pad_token_id", 0))
        return self.fn(ids, mask, tt)


def _pad_to_multiple(ids, mask, tt, multiple: int, pad_id: int):
    import torch.nn.functional as F

    s = ids.shape[1]
    extra = (-s) % multiple
    if not extra:
        return ids, mask, tt
    return (F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0), F.pad(tt, (0, extra), value=0))


def _load_teacher(inp: BenchInputs):
    from ltp_compress.modeling.model_io import load_stage_model
    from ltp_compress.tasks.glue import get_task

    if not inp.models.get("teacher"):
        raise BenchError("no FP teacher model available (pass a run directory or --teacher)")
    model, _, _ = load_stage_model(Path(inp.models["teacher"]), get_task(inp.task))
    return model.eval()


class _HFWrap:
    """nn.Module taking (input_ids, attention_mask, token_type_ids) positionally -> logits."""

    @staticmethod
    def make(model):
        import torch

        class HFLogits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

        return HFLogits(model).eval()


def _linear_amax(model, batches) -> dict[str, tuple[float, int]]:
    """{linear name: (max |x| over the calibration batches, input ndim)} through the HF forward."""
    import torch

    amax: dict[str, tuple[float, int]] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            def hook(mod, args, _n=n):
                x = args[0]
                prev = amax.get(_n, (0.0, x.ndim))[0]
                amax[_n] = (max(prev, float(x.detach().abs().max())) if x.numel() else prev, x.ndim)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.token_type_ids)
    finally:
        for h in hooks:
            h.remove()
    return amax


def build_system(name: str, inp: BenchInputs) -> System:
    import torch

    from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_packed

    if name == "hf_fp32_eager":
        model = _load_teacher(inp)
        return System(lambda i, m, t: model(input_ids=i, attention_mask=m, token_type_ids=t).logits,
                      {"api": "AutoModelForSequenceClassification(attn_implementation='eager')"})

    if name == "torch_dynamic_int8":
        qd = getattr(getattr(torch, "ao", None), "quantization", None)
        qd = getattr(qd, "quantize_dynamic", None)
        if qd is None:
            raise RuntimeError("torch.ao.quantization.quantize_dynamic is not available in this torch")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = qd(_load_teacher(inp), {torch.nn.Linear}, dtype=torch.qint8)
        return System(lambda i, m, t: model(input_ids=i, attention_mask=m, token_type_ids=t).logits,
                      {"api": "torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)",
                       "quantized_engine": torch.backends.quantized.engine})

    if name == "inc_static_int8":
        return _build_inc(inp)

    if name == "torchao_static_int8_compiled":
        return _build_torchao(inp)

    if name == "ltp_fp32":
        from ltp_compress.modeling.model_io import load_stage_model
        from ltp_compress.tasks.glue import get_task

        if not inp.models.get("hard"):
            raise BenchError("no hard-pruned FP model available (pass a run directory with an ltp_hard stage or --hard)")
        model, _, pruning = load_stage_model(Path(inp.models["hard"]), get_task(inp.task))
        model.eval()
        return System(lambda i, m, t: forward_packed(model, i, m, t, pruning).logits,
                      {"api": "forward_packed(hard model, PruningConfig from pruning.json)", "pruning": pruning.to_dict(),
                       "_model": model})

    if name == "dense_int8":
        from ltp_compress.modeling.quantized import calibrate, convert_to_int8

        teacher = _load_teacher(inp)
        none = PruningConfig()
        scales = calibrate(teacher, inp.calibration, none, inp.quant.get("observer", "minmax"),
                           inp.quant.get("percentile") or 99.99)
        qmodel, info = convert_to_int8(teacher, scales, inp.backend, fuse_gelu=inp.quant.get("fuse_gelu", True))
        del teacher
        return System(lambda i, m, t: forward_packed(qmodel, i, m, t, none).logits,
                      {"api": "calibrate(teacher, calib, PruningConfig()) + convert_to_int8(backend) + forward_packed(pruning none)",
                       "backend": info.backend, "observer": inp.quant.get("observer", "minmax"),
                       "percentile": inp.quant.get("percentile"), "fused_gelu_layers": len(info.fused_gelu),
                       "_model": qmodel})

    if name == "ltp_int8":
        from ltp_compress.modeling.deploy import load_deployable

        if not inp.models.get("int8"):
            raise BenchError("no deployable INT8 checkpoint available")
        dm = load_deployable(inp.models["int8"], inp.backend)
        pruning = dm.pruning
        return System(lambda i, m, t: forward_packed(dm.model, i, m, t, pruning).logits,
                      {"api": "load_deployable(path, backend) -> forward_packed(model, ..., pruning)", "backend": dm.backend,
                       "pruning": pruning.to_dict(), "load_notes": dm.notes, "_model": dm.model})

    raise BenchError(f"unknown system {name!r}; choose from {list(SYSTEMS)}")


def _build_inc(inp: BenchInputs) -> System:
    import torch
    import torch._dynamo

    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import convert, get_default_static_config, prepare

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # X86InductorQuantizer's qdq patterns are lowered to oneDNN int8 kernels only with freezing on
    # (as in INC's PT2E examples); without it the compiled graph runs dequantise + FP32 linear
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    teacher = _load_teacher(inp)
    wrapped = _HFWrap.make(teacher)
    first = inp.calibration[0]
    example = (first.input_ids, first.attention_mask, first.token_type_ids)
    max_seq = min(int(inp.max_seq_length), int(getattr(teacher.config, "max_position_embeddings", 512)))
    notes = []
    pad_multiple = None
    try:
        batch_dim = torch.export.Dim("batch", min=1, max=4096)
        seq_dim = torch.export.Dim("seq", min=2, max=max_seq)
        dyn = {k: {0: batch_dim, 1: seq_dim} for k in ("input_ids", "attention_mask", "token_type_ids")}
        exported = export(wrapped, example, dynamic_shapes=dyn)
        shapes = "dynamic batch and sequence dims (torch.export.Dim)"
    except Exception as e:  # fall back: bucket the sequence length, static export per bucket is not attempted
        notes.append(f"dynamic export failed ({type(e).__name__}: {str(e)[:200]}); exported with dynamic batch only, inputs padded to multiples of 16")
        pad_multiple = 16
        batch_dim = torch.export.Dim("batch", min=1, max=4096)
        seq_dim = torch.export.Dim("seq16", min=1, max=max(1, max_seq // 16)) * 16
        dyn = {k: {0: batch_dim, 1: seq_dim} for k in ("input_ids", "attention_mask", "token_type_ids")}
        ex = _pad_to_multiple(*example, 16, inp.pad_token_id)
        exported = export(wrapped, ex, dynamic_shapes=dyn)
        shapes = "dynamic batch, sequence padded to multiples of 16"
    prepared = prepare(exported, get_default_static_config())
    with torch.no_grad():
        for b in inp.calibration:
            args = (b.input_ids, b.attention_mask, b.token_type_ids)
            if pad_multiple:
                args = _pad_to_multiple(*args, pad_multiple, inp.pad_token_id)
            prepared(*args)
    q = convert(prepared)
    compiled = torch.compile(q, dynamic=True)
    return System(lambda i, m, t: compiled(i, m, t),
                  {"api": "neural_compressor.torch.export.export(dynamic_shapes) -> prepare(get_default_static_config()) -> "
                          "calibrate -> convert -> torch._inductor.config.freezing = True; torch.compile(dynamic=True)",
                   "shapes": shapes, "notes": notes, "pad_token_id": inp.pad_token_id,
                   "inc_version": _version("neural_compressor")}, pad_multiple=pad_multiple)


def _build_torchao(inp: BenchInputs) -> System:
    import torch
    import torch._dynamo

    from torchao.quantization import Int8StaticActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model = _load_teacher(inp)
    amax = _linear_amax(model, inp.calibration)
    for n, (a, ndim) in amax.items():
        scale = torch.full([1] * ndim, (a / 127.0) if a > 0 else 1.0, dtype=torch.float32)
        cfg = Int8StaticActivationInt8WeightConfig(act_quant_scale=scale, granularity=[PerTensor(), PerRow()],
                                                   act_mapping_type=MappingType.SYMMETRIC)
        quantize_(model, cfg, filter_fn=lambda mod, fqn, _n=n: fqn == _n)
    wrapped = _HFWrap.make(model)
    compiled = torch.compile(wrapped, dynamic=True)
    return System(lambda i, m, t: compiled(i, m, t),
                  {"api": "torchao.quantization.quantize_(model, Int8StaticActivationInt8WeightConfig(act_quant_scale=max|x|/127 "
                          "per Linear, granularity=[PerTensor(), PerRow()], act_mapping_type=SYMMETRIC), filter_fn=that Linear) "
                          "-> torch.compile(dynamic=True)",
                   "calibration": "max |x| per Linear input over the calibration batches (HF forward)",
                   "linears_quantized": len(amax), "torchao_version": _version("torchao")})


def _version(mod: str) -> str | None:
    try:
        import importlib.metadata as md

        return md.version({"neural_compressor": "neural-compressor"}.get(mod, mod))
    except Exception:
        return None


# ----------------------------------------------------------------------------- measuring


def _observed_int8_ops(system: System, batch) -> list[str]:
    """Names of int8 / quantized ops seen by the profiler on one batch (honesty check for peers)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    keys = ("qlinear", "_int_mm", "quantized", "int8", "dynamic_quant", "qgemm", "onednn")
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        system.logits(batch)
    return sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)})


def measure_system(name: str, inp: BenchInputs) -> dict:
    """Build one system and measure it (in the current process)."""
    import torch

    from ltp_compress.tasks.glue import get_task

    torch.set_num_threads(inp.threads)
    task = get_task(inp.task)
    res: dict = {"system": name, "description": DESCRIPTIONS.get(name, ""), "status": "ok"}
    rss0 = _rss_mb()
    import torch._inductor.config as inductor_config

    saved_inductor = inductor_config.get_config_copy()  # compiled systems change it; restored below
    try:
        return _measure(name, inp, task, res, rss0)
    finally:
        inductor_config.load_config(saved_inductor)


def _measure(name: str, inp: BenchInputs, task, res: dict, rss0: float) -> dict:
    import torch

    from ltp_compress.kernels import kernel_counters
    from ltp_compress.tasks.metrics import compute_metrics
    from ltp_compress.stages.common import predictions_from_logits

    t0 = time.perf_counter()
    system = build_system(name, inp)
    res["setup_s"] = time.perf_counter() - t0
    model = system.info.pop("_model", None)
    res["info"] = system.info
    counters0 = kernel_counters()
    runs = []
    preds_by_bs: dict[int, list] = {}
    with torch.inference_mode():
        for bs in sorted(inp.batches):
            batches = inp.batches[bs]
            n = sum(len(b) for b in batches)
            preds: list = [None] * len(inp.labels)
            tw = time.perf_counter()
            for b in batches:  # warmup pass (compilation for compiled systems), predictions
                out = system.logits(b)
                for j, p in zip(b.index.tolist(), predictions_from_logits(out, task.num_labels).tolist()):
                    preds[j] = p
            warmup_s = time.perf_counter() - tw
            preds_by_bs[bs] = preds
            times, lat = [], []
            for _ in range(max(1, inp.repeats)):
                t1 = time.perf_counter()
                if bs == 1:
                    for b in batches:
                        s = time.perf_counter()
                        system.logits(b)
                        lat.append(time.perf_counter() - s)
                else:
                    for b in batches:
                        system.logits(b)
                times.append(time.perf_counter() - t1)
            med = statistics.median(times)
            r = {"batch_size": bs, "examples": n, "batches": len(batches), "warmup_s": warmup_s,
                 "times_s": times, "median_s": med, "examples_per_s": n / med if med > 0 else float("inf")}
            if bs == 1 and lat:
                r["latency_ms_p50"] = 1e3 * float(np.percentile(lat, 50))
                r["latency_ms_p95"] = 1e3 * float(np.percentile(lat, 95))
            runs.append(r)
    counters1 = kernel_counters()
    delta = {k: counters1.get(k, 0) - counters0.get(k, 0) for k in counters1 if counters1.get(k, 0) != counters0.get(k, 0)}
    if name in ("dense_int8", "ltp_int8"):
        res["kernel_counters"] = delta  # kernel_counters() deltas over the warmup + timed passes of every batch size
        res["kernel_counters_passes"] = len(inp.batches) * (1 + max(1, inp.repeats))
    res["runs"] = runs
    main_bs = max(preds_by_bs)
    preds = preds_by_bs[main_bs]
    res["predictions_batch_size"] = main_bs
    res["predictions"] = preds
    res["metrics"] = {k: float(v) for k, v in compute_metrics(task, preds, inp.labels).items()}
    res["accuracy"] = res["metrics"].get("accuracy")  # None for regression (STS-B)
    agree = {}
    for bs, p in preds_by_bs.items():
        if bs != main_bs:
            agree[str(bs)] = float(np.mean([_same(a, b) for a, b in zip(p, preds)])) if preds else 1.0
    res["prediction_agreement_vs_main_bs"] = agree
    bs1 = next((r for r in runs if r["batch_size"] == 1), None)
    if bs1:
        res["latency_ms_p50"], res["latency_ms_p95"] = bs1.get("latency_ms_p50"), bs1.get("latency_ms_p95")
    try:
        probe = inp.batches[main_bs][0]
        res["int8_ops_observed"] = _observed_int8_ops(system, probe)
    except Exception as e:  # diagnostics only
        res["int8_ops_observed"] = f"profiler failed: {type(e).__name__}: {e}"
    if name == "ltp_int8" and inp.profile_bs:
        pbs = inp.profile_bs if inp.profile_bs in inp.batches else max(inp.batches)
        try:
            res["profile"] = profile_int8(system, model, inp.batches[pbs], pbs, inp)
        except Exception as e:
            res["profile"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    res["rss_before_build_mb"] = rss0
    res["rss_after_mb"] = _rss_mb()
    res["peak_rss_mb_process"] = _maxrss_mb()
    return res


def _same(a, b) -> bool:
    return a == b if isinstance(a, int) else abs(a - b) < 1e-4


# ----------------------------------------------------------------------------- profile


ATTN_OPS = ("aten::matmul", "aten::bmm", "aten::baddbmm", "aten::softmax", "aten::_softmax", "aten::masked_fill",
            "aten::masked_fill_", "aten::transpose", "aten::expand", "aten::_unsafe_view")
SELECT_OPS = ("aten::sum", "aten::gt", "aten::__and__", "aten::bitwise_and", "aten::index", "aten::index_put_",
              "aten::nonzero", "aten::lt", "aten::argsort", "aten::sort", "aten::scatter_", "aten::ceil", "aten::clamp",
              "aten::minimum", "aten::masked_select")
GEMM_KERNEL_OPS = ("onednn::qlinear_pointwise", "aten::_int_mm")
PACK_LABEL, INT8_LABEL, EMB_LABEL = "ltp::token_pack", "ltp::int8_linear", "ltp::embeddings"
SUMMARY_CLASSES = {  # the four headline classes -> the fine classes they sum
    "int8_linear_kernels": ("int8_linear_gemm", "int8_linear_quantize_epilogue"),
    "attention_matmul_softmax": ("attention_matmul_softmax",),
    "layernorm_gelu_other": ("layernorm", "gelu", "embeddings", "other"),
    "token_gather_pack": ("token_gather_pack", "token_scoring_select"),
}


def _op_class(key: str, ancestors: set[str], input_shapes) -> str:
    if INT8_LABEL in ancestors:
        return "int8_linear_gemm" if key in GEMM_KERNEL_OPS else "int8_linear_quantize_epilogue"
    if key in GEMM_KERNEL_OPS:
        return "int8_linear_gemm"
    if PACK_LABEL in ancestors:
        return "token_gather_pack"
    if EMB_LABEL in ancestors:
        return "embeddings"
    if key in ("aten::layer_norm", "aten::native_layer_norm"):
        return "layernorm"
    if key == "aten::gelu":
        return "gelu"
    if key in ATTN_OPS:
        return "attention_matmul_softmax"
    if key == "aten::mul":
        # att * scaling (scalar operand) is attention; probs * valid[:, None, :, None] is token scoring
        shapes = list(input_shapes or [])
        second = shapes[1] if len(shapes) > 1 else []
        return "token_scoring_select" if (isinstance(second, (list, tuple)) and len(second) == 4) else "attention_matmul_softmax"
    if key == "aten::div" or key in SELECT_OPS:
        return "token_scoring_select"
    return "other"


@contextlib.contextmanager
def _annotated(model):
    """Temporarily wrap Int8Linear forwards, the embeddings and PackedLayout's pack/unpack methods
    in profiler labels, and count the MACs of every Int8Linear call."""
    from torch.profiler import record_function

    from ltp_compress.kernels import Int8Linear
    from ltp_compress.modeling import pruned_encoder as pe

    stats = {"macs": 0, "calls": 0}
    wrapped = []

    def wrap_module(mod, label, count=False):
        orig = mod.forward

        def fwd(*a, _orig=orig, _mod=mod, **k):
            if count:
                x = a[0]
                stats["macs"] += (x.numel() // _mod.in_features) * _mod.in_features * _mod.out_features
                stats["calls"] += 1
            with record_function(label):
                return _orig(*a, **k)
        mod.forward = fwd
        wrapped.append(mod)

    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            wrap_module(mod, INT8_LABEL, count=True)
    wrap_module(pe.base_model(model).embeddings, EMB_LABEL)
    saved = {}
    for meth in ("pack", "unpack", "valid_mask", "first_rows"):
        orig = getattr(pe.PackedLayout, meth, None)
        if orig is None:
            continue
        saved[meth] = orig

        def m(self, *a, _orig=orig, **k):
            with record_function(PACK_LABEL):
                return _orig(self, *a, **k)
        setattr(pe.PackedLayout, meth, m)
    orig_from = pe.PackedLayout.__dict__["from_lengths"]

    def from_lengths(cls, *a, _orig=orig_from.__func__, **k):
        with record_function(PACK_LABEL):
            return _orig(cls, *a, **k)
    pe.PackedLayout.from_lengths = classmethod(from_lengths)
    try:
        yield stats
    finally:
        for mod in wrapped:
            del mod.forward
        for meth, orig in saved.items():
            setattr(pe.PackedLayout, meth, orig)
        pe.PackedLayout.from_lengths = orig_from


def profile_int8(system: System, model, batches, bs: int, inp: BenchInputs) -> dict:
    """torch.profiler (self CPU time) over one pass of `batches` through the ltp_int8 model.

    Int8Linear forwards, the embeddings and PackedLayout's pack/unpack are labelled with
    ``record_function`` for the pass, so self time splits into: INT8 GEMM kernel (oneDNN qlinear /
    _int_mm op), INT8 quantise + epilogue (the rest of Int8Linear), attention matmuls + softmax
    (+ mask, scaling), layernorm, gelu, embeddings, token gather/pack (PackedLayout), token
    scoring/selection (importance scores, threshold, row gather) and other. Effective GOP/s of
    the in-model GEMMs = 2 * MACs (M*K*N of every Int8Linear call) / kernel self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for b in batches[:2]:
            system.logits(b)  # warm
    with _annotated(model) as stats, torch.inference_mode():
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for b in batches:
                system.logits(b)
        wall = time.perf_counter() - t0
    by_class: dict[str, float] = {}
    by_op: dict[str, list] = {}
    kernel_us = 0.0
    for e in prof.events():
        key = e.name
        if key.startswith("ltp::") or key.startswith("ProfilerStep"):
            continue
        anc = set()
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("ltp::"):
                anc.add(p.name)
            p = p.cpu_parent
        self_us = e.self_cpu_time_total
        cls = _op_class(key, anc, getattr(e, "input_shapes", None))
        by_class[cls] = by_class.get(cls, 0.0) + self_us
        agg = by_op.setdefault((key, cls), [0, 0.0])
        agg[0] += 1
        agg[1] += self_us
        if key in GEMM_KERNEL_OPS:
            kernel_us += self_us
    total_us = sum(by_class.values())
    gemm_macs = stats["macs"]
    eff = 2.0 * gemm_macs / (kernel_us * 1e-6) / 1e9 if kernel_us > 0 else None
    int8_total_us = by_class.get("int8_linear_gemm", 0.0) + by_class.get("int8_linear_quantize_epilogue", 0.0)
    eff_incl = 2.0 * gemm_macs / (int8_total_us * 1e-6) / 1e9 if int8_total_us > 0 else None
    ref = standalone_int8_rate(model, batches, inp)
    top = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:25]
    summary = {k: sum(by_class.get(c, 0.0) for c in cs) * 1e-6 for k, cs in SUMMARY_CLASSES.items()}
    best = ref.get("gops")
    return {
        "status": "ok", "batch_size": bs, "batches": len(batches), "examples": sum(len(b) for b in batches),
        "wall_s_profiled": wall, "profiled_self_cpu_s": total_us * 1e-6,
        "time_by_summary_class_s": summary,
        "fraction_by_summary_class": {k: v / (total_us * 1e-6) for k, v in summary.items()} if total_us else {},
        "time_by_class_s": {k: v * 1e-6 for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "fraction_by_class": {k: v / total_us for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])} if total_us else {},
        "top_ops": [{"op": k[0], "class": k[1], "calls": v[0], "self_s": v[1] * 1e-6} for k, v in top],
        "int8_linear_calls": stats["calls"], "int8_gemm_macs": gemm_macs,
        "int8_gemm_kernel_s": kernel_us * 1e-6,
        "effective_gemm_gops": eff,
        "effective_int8_linear_gops_incl_quantize": eff_incl,
        "standalone_reference": ref,
        "gemm_efficiency_vs_best_standalone": (eff / best) if (eff and best) else None,
        "note": "self CPU times from torch.profiler (profiling adds overhead, esp. for small ops)",
    }


def standalone_int8_rate(model, batches, inp: BenchInputs) -> dict:
    """Best standalone INT8 GEMM rate at the model's shapes: the max of a quick measurement of the
    model's own kernel at a typical shape (M = mean tokens of a profiled batch, K = hidden,
    N = intermediate) and the best `*:gemm` result of gemm_bench.json at the model's (K, N) when
    that file is present (its best at any shape is reported for context only)."""
    import torch

    from ltp_compress.kernels import Int8Linear, int8_linear, onednn_qlinear_u8, quantize_u8_zp128

    out: dict = {}
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, Int8Linear)}
    if inp.gemm_bench_json and Path(inp.gemm_bench_json).is_file():
        try:
            data = json.loads(Path(inp.gemm_bench_json).read_text())
            gem = [r for r in data.get("results", []) if r.get("kind") == "int8_gemm"]
            if gem:
                best = max(gem, key=lambda r: r["gops"])
                out["gemm_bench_best_any_shape"] = {k: best[k] for k in ("M", "K", "N", "impl", "gops")}
                same = [r for r in gem if (r["K"], r["N"]) in shapes]
                if same:
                    bm = max(same, key=lambda r: r["gops"])
                    out["gemm_bench_best_model_shapes"] = {k: bm[k] for k in ("M", "K", "N", "impl", "gops")}
                out["gemm_bench_file"] = inp.gemm_bench_json
                out["gemm_bench_loadavg_before"] = data.get("meta", {}).get("loadavg_before")
        except (ValueError, KeyError, TypeError, OSError) as e:
            out["gemm_bench_error"] = str(e)
    lin = next((m for n, m in model.named_modules() if isinstance(m, Int8Linear) and n.endswith("intermediate.dense")), None)
    lin = lin or next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if lin is not None:
        m_rows = int(np.mean([int(b.attention_mask.sum()) for b in batches]))
        x = torch.randn(max(1, m_rows), lin.in_features)
        packed = lin.packed_weight()
        reps = []
        with torch.inference_mode():
            if packed.backend in ("cpu_vnni", "cpu_avx2"):
                xs = float(x.abs().max()) / 127.0
                xu8 = quantize_u8_zp128(x, xs)

                def fn():
                    return onednn_qlinear_u8(xu8, xs, packed)
                what = "onednn::qlinear_pointwise on pre-quantised u8 input"
            else:
                xs = float(x.abs().max()) / 127.0

                def fn():
                    return int8_linear(x, xs, packed)
                what = f"int8_linear ({packed.backend})"
            for _ in range(3):
                fn()
            for _ in range(10):
                t = time.perf_counter()
                fn()
                reps.append(time.perf_counter() - t)
        med = statistics.median(reps)
        out.update({"measured": {"M": int(x.shape[0]), "K": lin.in_features, "N": lin.out_features, "what": what,
                                 "gops": 2.0 * x.shape[0] * lin.in_features * lin.out_features / med / 1e9}})
    cands = [v["gops"] for v in (out.get("gemm_bench_best_model_shapes"), out.get("measured")) if v]
    out["gops"] = max(cands) if cands else None
    return out


# ----------------------------------------------------------------------------- isolation


def _child(name: str, inp: BenchInputs, conn) -> None:
    try:
        res = measure_system(name, inp)
        res["peak_rss_mb"] = res.pop("peak_rss_mb_process")
        res["rss_method"] = "ru_maxrss of a fresh spawn child running only this system (includes interpreter, torch, inputs)"
        conn.send(res)
    except BaseException as e:  # report, never crash the parent
        conn.send({"system": name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-4000:], "peak_rss_mb": _maxrss_mb()})
    finally:
        conn.close()


def run_system(name: str, inp: BenchInputs, isolation: str = "subprocess", timeout_s: float = 3600.0) -> dict:
    """Measure one system; never raises (a failure becomes {"status": "failed", "error": ...})."""
    if isolation == "inprocess":
        try:
            res = measure_system(name, inp)
            res["peak_rss_mb"] = None
            res["rss_growth_mb"] = res["rss_after_mb"] - res["rss_before_build_mb"]
            res.pop("peak_rss_mb_process", None)
            res["rss_method"] = "in-process: VmRSS growth while building and running this system (current RSS, not a peak)"
            return res
        except Exception as e:
            return {"system": name, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, inp, child), name=f"bench-{name}")
    proc.start()
    child.close()
    res = None
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if parent.poll(1.0):
                try:
                    res = parent.recv()
                except EOFError:
                    res = None
                break
            if not proc.is_alive() and not parent.poll(0.1):
                break
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if res is None:
        why = f"timed out after {timeout_s:.0f} s" if time.time() >= deadline else f"child process exited with code {proc.exitcode} without a result"
        return {"system": name, "status": "failed", "error": why}
    return res


# ----------------------------------------------------------------------------- orchestration


def _load_inputs(models: dict, data_dir: Path, task_name: str, batch_sizes, max_examples, threads, repeats,
                 calibration_batches: int, calibration_batch_size: int, backend: str, profile_bs, gemm_bench_json) -> tuple[BenchInputs, dict]:
    import torch

    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, split_file, tokenize_split
    from ltp_compress.modeling.model_io import load_tokenizer
    from ltp_compress.tasks.glue import get_task

    torch.set_num_threads(threads)
    task = get_task(task_name)
    src = next((models[k] for k in ("int8", "teacher", "hard") if models.get(k) and Path(models[k]).is_dir()), None)
    if not src:
        raise BenchError("no model to benchmark")
    tok = load_tokenizer(src)
    max_seq = 128
    quant = {"observer": "minmax", "percentile": None, "fuse_gelu": True}
    if models.get("int8") and (Path(models["int8"]) / MANIFEST_FILE).is_file():
        ltp = read_deployable_info(models["int8"])
        max_seq = int(ltp.get("max_seq_length", max_seq))
        q = ltp.get("quantization") or {}
        quant.update({"observer": q.get("observer") or "minmax", "percentile": q.get("percentile"),
                      "fuse_gelu": bool(q.get("fused_gelu", True))})
    elif models.get("run_dir"):
        max_seq = int(RunDir(Path(models["run_dir"])).recipe().get("data", {}).get("max_seq_length", 128))
    stage_cfg = (models.get("int8_stage") or {}).get("config") or {}
    if stage_cfg:
        quant["observer"] = stage_cfg.get("observer", quant["observer"])
        quant["percentile"] = stage_cfg.get("percentile", quant["percentile"])
        quant["fuse_gelu"] = stage_cfg.get("fuse_gelu", quant["fuse_gelu"])
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BenchError(f"{data_dir}: not a folder (expected a GLUE-format folder with dev.tsv)")
    cfg = DataConfig(source="glue_dir", path=str(data_dir), max_seq_length=max_seq, max_dev_examples=max_examples,
                     max_train_examples=calibration_batches * calibration_batch_size * 4)
    dev = load_split(cfg, task, "dev")
    ts = tokenize_split(dev, tok, max_seq, num_labels=task.num_labels)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = {int(bs): length_bucketed_batches(ts, int(bs), shuffle=False, seed=0, pad_token_id=pad) for bs in batch_sizes}
    train_path = split_file(cfg, task, "train")
    if train_path is not None and train_path.is_file():
        tr = tokenize_split(load_split(cfg, task, "train", seed=0), tok, max_seq, num_labels=task.num_labels)
        calib = length_bucketed_batches(tr, calibration_batch_size, shuffle=True, seed=0, pad_token_id=pad)[:calibration_batches]
        calib_src = f"{train_path}: {len(calib)} shuffled length-bucketed batches of {calibration_batch_size}"
    else:
        calib = length_bucketed_batches(ts, calibration_batch_size, shuffle=True, seed=0, pad_token_id=pad)[:calibration_batches]
        calib_src = f"DEV data ({dev.source}; no train file found): {len(calib)} batches of {calibration_batch_size} - calibration overlaps the evaluation set"
    inp = BenchInputs(task=task_name, models={k: models.get(k) for k in ("teacher", "hard", "int8")}, batches=batches,
                      calibration=calib, calibration_source=calib_src, labels=list(ts.labels), threads=threads,
                      repeats=repeats, max_seq_length=max_seq, pad_token_id=int(pad), quant=quant, backend=backend,
                      profile_bs=profile_bs, gemm_bench_json=str(gemm_bench_json) if gemm_bench_json else None)
    meta = {"dev_source": dev.source, "examples": len(ts), "mean_tokens": float(ts.lengths.mean()),
            "max_tokens": int(ts.lengths.max()), "max_seq_length": max_seq, "calibration": calib_src,
            "quant_config_for_dense_int8": quant}
    return inp, meta


def add_ratios(results: dict[str, dict], batch_sizes) -> dict:
    """Per successful system and batch size: throughput ratio vs hf_fp32_eager and vs the best
    successful dense INT8 peer (max of the third-party INT8 systems at that batch size)."""
    def thr(name, bs):
        r = results.get(name)
        if not r or r.get("status") != "ok":
            return None
        return next((x["examples_per_s"] for x in r["runs"] if x["batch_size"] == bs), None)

    best_peer = {}
    for bs in batch_sizes:
        cands = [(thr(p, bs), p) for p in INT8_PEERS if thr(p, bs)]
        best_peer[str(bs)] = {"system": max(cands)[1], "examples_per_s": max(cands)[0]} if cands else None
    for name, r in results.items():
        if r.get("status") != "ok":
            continue
        ratios = {}
        for bs in batch_sizes:
            t = thr(name, bs)
            base = thr(BASELINE, bs)
            bp = best_peer[str(bs)]
            ratios[str(bs)] = {"vs_hf_fp32_eager": (t / base) if (t and base) else None,
                               "vs_best_int8_peer": (t / bp["examples_per_s"]) if (t and bp) else None,
                               "best_int8_peer": bp["system"] if bp else None}
        r["ratios"] = ratios
    return best_peer


def run_benchmark(checkpoint: str | Path | None = None, *, run_dir: str | Path | None = None,
                  teacher: str | Path | None = None, hard: str | Path | None = None, int8: str | Path | None = None,
                  data_dir: str | Path, task: str, threads: int = 2, batch_sizes=(1, 8, 32),
                  max_examples: int | None = None, repeats: int = 3, systems=None,
                  isolation: str = "subprocess", calibration_batches: int = 16, calibration_batch_size: int = 32,
                  backend: str = "auto", profile_bs: int | None = 32,
                  gemm_bench_json: str | Path | None = "benchmarks/results/gemm_bench.json",
                  out_dir: str | Path | None = None, name: str = "e2e_bench", command: str | None = None,
                  log=print) -> dict:
    """Benchmark the systems (default: all of :data:`SYSTEMS`) on the dev set; returns the result
    dict and, with `out_dir`, writes `<out_dir>/<name>.json` and `.md`.

    Models: `checkpoint` (run directory or deployable INT8 folder) and/or `run_dir`, with
    explicit `teacher` / `hard` / `int8` paths overriding what the run provides. A system whose
    model is missing or which raises is recorded as failed with the reason."""
    systems = list(systems) if systems else list(SYSTEMS)
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise BenchError(f"unknown systems {bad}; choose from {list(SYSTEMS)}")
    if isolation not in ("subprocess", "inprocess"):
        raise BenchError("isolation must be 'subprocess' or 'inprocess'")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    models = resolve_models(checkpoint, run_dir=run_dir, teacher=teacher, hard=hard, int8=int8)
    load0 = _loadavg()
    inp, data_meta = _load_inputs(models, Path(data_dir), task, batch_sizes, max_examples, threads, repeats,
                                  calibration_batches, calibration_batch_size, backend, profile_bs, gemm_bench_json)
    results: dict[str, dict] = {}
    for s in systems:
        need = NEEDS[s]
        if not models.get(need):
            results[s] = {"system": s, "status": "failed", "error": f"no {need} model available for this checkpoint"}
            log(f"[bench] {s}: skipped (no {need} model)")
            continue
        log(f"[bench] {s}: running ({isolation})")
        t0 = time.perf_counter()
        results[s] = run_system(s, inp, isolation)
        results[s]["wall_s_total"] = time.perf_counter() - t0
        r = results[s]
        if r.get("status") == "ok":
            log(f"[bench] {s}: {r['metrics'].get('main', float('nan')):.4f} main metric; "
                + ", ".join(f"bs{x['batch_size']} {x['examples_per_s']:.1f} ex/s" for x in r["runs"]))
        else:
            log(f"[bench] {s}: FAILED: {r.get('error')}")
    best_peer = add_ratios(results, batch_sizes)
    import torch

    from ltp_compress.kernels import cpu_isa

    out = {
        "format": "ltp-compress-e2e-bench", "version": 1,
        "command": command or " ".join(sys.argv),
        "task": task, "data_dir": str(data_dir), "models": {k: models[k] for k in ("teacher", "hard", "int8", "run_dir")},
        "model_notes": models["notes"], "threads": threads, "batch_sizes": batch_sizes, "repeats": repeats,
        "max_examples": max_examples, "isolation": isolation, "data": data_meta,
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_isa": _safe(cpu_isa), "cpu_count": os.cpu_count(),
                        "neural_compressor": _version("neural_compressor"), "torchao": _version("torchao"),
                        "transformers": _version("transformers")},
        "loadavg_before": load0, "loadavg_after": _loadavg(),
        "systems": systems, "best_int8_peer": best_peer, "results": results,
        "method": ("same tokenised dev examples and the same length-bucketed, dynamically padded batches for every system; "
                   "throughput = examples / median of `repeats` timed passes after one warmup pass (warmup includes "
                   "torch.compile); bs-1 latency percentiles over every example of the timed passes; accuracy from the "
                   "warmup pass at the largest batch size"),
    }
    if out_dir is not None:
        write_outputs(out, Path(out_dir), name)
    return out


def _safe(fn):
    try:
        return fn()
    except Exception as e:
        return str(e)


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ----------------------------------------------------------------------------- output


def _fmt(v, nd=1, suffix=""):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}{suffix}"


def render_markdown(res: dict) -> str:
    bss = res["batch_sizes"]
    L = ["# End-to-end inference benchmark", "",
         f"task `{res['task']}`, {res['data']['examples']} dev examples (mean {res['data']['mean_tokens']:.1f} tokens, "
         f"max {res['data']['max_tokens']}), {res['threads']} threads, batch sizes {bss}, {res['repeats']} timed repeats, "
         f"isolation: {res['isolation']}", "",
         f"models: teacher `{res['models']['teacher']}`, hard `{res['models']['hard']}`, int8 `{res['models']['int8']}`", "",
         f"load average before / after: {res['loadavg_before']} / {res['loadavg_after']} "
         "(other processes on the machine distort timings)", ""]
    head = ["system", "main metric", "accuracy"] + [f"bs{b} ex/s" for b in bss] + ["bs1 p50 ms", "bs1 p95 ms", "peak RSS MB"]
    head += [f"bs{b} vs HF" for b in bss] + [f"bs{b} vs best INT8 peer" for b in bss] + ["setup s", "warmup s"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["systems"]:
        r = res["results"][s]
        if r.get("status") != "ok":
            reason = str(r.get("error", "unknown")).replace("|", "/").replace("\n", " ")[:160]
            L.append(f"| {s} | failed: {reason} |" + " |" * (len(head) - 2))
            continue
        thr = {x["batch_size"]: x for x in r["runs"]}
        rss = r.get("peak_rss_mb")
        rss_s = _fmt(rss, 0) if rss is not None else (f"+{_fmt(r.get('rss_growth_mb'), 0)} (growth)")
        row = [s, _fmt(r["metrics"].get("main"), 4), _fmt(r.get("accuracy"), 4)]
        row += [_fmt(thr[b]["examples_per_s"]) if b in thr else "-" for b in bss]
        row += [_fmt(r.get("latency_ms_p50"), 2), _fmt(r.get("latency_ms_p95"), 2), rss_s]
        row += [_fmt(r["ratios"][str(b)]["vs_hf_fp32_eager"], 2, "x") for b in bss]
        row += [_fmt(r["ratios"][str(b)]["vs_best_int8_peer"], 2, "x") for b in bss]
        row += [_fmt(r.get("setup_s"), 1), " / ".join(_fmt(thr[b]["warmup_s"], 1) for b in bss if b in thr)]
        L.append("| " + " | ".join(row) + " |")
    L += ["", "best dense INT8 peer per batch size: "
          + ", ".join(f"bs{b}: {(v or {}).get('system', 'none')}" for b, v in res["best_int8_peer"].items()), ""]
    L += ["## Systems", ""]
    for s in res["systems"]:
        r = res["results"][s]
        info = r.get("info", {})
        line = f"- `{s}`: {DESCRIPTIONS.get(s, '')}"
        if info.get("api"):
            line += f"; API: `{info['api']}`"
        if r.get("status") != "ok":
            line += f"; **failed**: {r.get('error')}"
        else:
            ops = r.get("int8_ops_observed")
            if ops is not None:
                line += f"; int8 ops seen by the profiler: {ops if ops else 'none'}"
            if r.get("kernel_counters") is not None:
                line += f"; kernel counters: {r['kernel_counters']}"
            for n in info.get("notes") or []:
                line += f"; note: {n}"
            if info.get("shapes"):
                line += f"; shapes: {info['shapes']}"
        L.append(line)
    L += ["", f"calibration for INT8 systems (inc, torchao, dense_int8): {res['data']['calibration']}", ""]
    prof = (res["results"].get("ltp_int8") or {}).get("profile")
    if prof:
        L += [f"## Profile: ltp_int8 at bs {prof.get('batch_size')}", ""]
        if prof.get("status") != "ok":
            L.append(f"failed: {prof.get('error')}")
        else:
            L += ["| op class | self CPU s | fraction |", "|---|---|---|"]
            for k, v in prof["time_by_summary_class_s"].items():
                L.append(f"| **{k}** | {v:.4f} | {prof['fraction_by_summary_class'].get(k, 0):.1%} |")
            for k, v in prof["time_by_class_s"].items():
                L.append(f"| {k} | {v:.4f} | {prof['fraction_by_class'].get(k, 0):.1%} |")
            ref = prof.get("standalone_reference") or {}
            L += ["", f"INT8 GEMMs inside the model: {prof['int8_linear_calls']} calls, {prof['int8_gemm_macs'] / 1e9:.3f} GMAC, "
                  f"kernel time {prof['int8_gemm_kernel_s']:.4f} s -> effective {_fmt(prof['effective_gemm_gops'], 1)} GOP/s "
                  f"(incl. activation quantisation: {_fmt(prof['effective_int8_linear_gops_incl_quantize'], 1)} GOP/s); "
                  f"best standalone at the model's shapes {_fmt(ref.get('gops'), 1)} GOP/s "
                  f"(measured now: {ref.get('measured')}; gemm_bench.json at model shapes: {ref.get('gemm_bench_best_model_shapes')}, "
                  f"any shape: {ref.get('gemm_bench_best_any_shape')}); "
                  f"efficiency {_fmt(prof.get('gemm_efficiency_vs_best_standalone'), 2)}", ""]
    L += ["", res["method"], "", f"command: `{res['command']}`", ""]
    return "\n".join(L)


def write_outputs(res: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, mp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jp.write_text(json.dumps(res, indent=2, default=str))
    mp.write_text(render_markdown(res))
    return jp, mp


def bench_cli(args, command: str | None = None) -> int:
    """Run the benchmark from parsed `bench_args.add_bench_arguments` arguments; print the Markdown table."""
    res = run_benchmark(args.checkpoint, run_dir=args.run_dir, teacher=args.teacher, hard=args.hard, data_dir=args.data,
                        task=args.task, threads=args.threads,
                        batch_sizes=[int(x) for x in args.batch_sizes.split(",") if x.strip()],
                        max_examples=args.max_examples, repeats=args.repeats,
                        systems=[x.strip() for x in args.systems.split(",")] if args.systems else None,
                        isolation=args.isolation, calibration_batches=args.calibration_batches, backend=args.backend,
                        profile_bs=args.profile_bs or None, gemm_bench_json=args.gemm_bench, out_dir=args.out_dir,
                        name=args.name, command=command or "ltp-compress " + " ".join(sys.argv[1:]),
                        log=lambda m: print(m, file=sys.stderr))
    print(render_markdown(res))
    print(f"wrote {Path(args.out_dir) / (args.name + '.json')} and {args.name}.md", file=sys.stderr)
    failed = [s for s, r in res["results"].items() if r.get("status") != "ok"]
    if failed:
        print(f"note: failed systems: {failed} (see the JSON for the errors)", file=sys.stderr)
    return 0
