"""Op-class profile of our torch runtime (the `ltp_int8` system of the end-to-end benchmark).

torch.profiler self CPU time over one pass, Int8Linear forwards, the embeddings and PackedLayout's
pack/unpack labelled with ``record_function``; effective GOP/s of the in-model INT8 GEMMs against a
standalone rate at the model's shapes."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import numpy as np

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


def profile_int8(system, model, batches, bs: int, inp) -> dict:
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


def standalone_int8_rate(model, batches, inp) -> dict:
    """Best standalone INT8 GEMM rate at the model's shapes: the max of a quick measurement of the
    model's own kernel at a typical shape (M = mean tokens of a profiled batch, K = hidden,
    N = intermediate) and the best `*:gemm` result of gemm_bench.json at the model's (K, N) when
    that file is present (its best at any shape is reported for context only)."""
    import torch

    from ltp_compress.kernels import Int8Linear, int8_linear, onednn_qlinear_u8, quantize_u8_zp128
    from ltp_compress.pipeline.environment import check_same_isa, environment_block

    out: dict = {}
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, Int8Linear)}
    if inp.gemm_bench_json and Path(inp.gemm_bench_json).is_file():
        try:
            data = json.loads(Path(inp.gemm_bench_json).read_text())
            # its figures count only when measured on this benchmark's ISA (EnvironmentMismatch otherwise)
            here = inp.environment or environment_block(inp.threads, None)
            check_same_isa({"this benchmark": here, inp.gemm_bench_json: data.get("environment")}, speed=True)
            gem = [r for r in data.get("results", []) if r.get("kind") == "int8_gemm"]
            if gem:
                best = max(gem, key=lambda r: r["gops"])
                out["gemm_bench_best_any_shape"] = {k: best[k] for k in ("M", "K", "N", "impl", "gops")}
                same = [r for r in gem if (r["K"], r["N"]) in shapes]
                if same:
                    bm = max(same, key=lambda r: r["gops"])
                    out["gemm_bench_best_model_shapes"] = {k: bm[k] for k in ("M", "K", "N", "impl", "gops")}
                out["gemm_bench_file"] = inp.gemm_bench_json
                out["gemm_bench_loadavg_before"] = data["environment"]["loadavg_start"]
        except (ValueError, KeyError, TypeError, OSError) as e:  # EnvironmentMismatch is a ValueError
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

