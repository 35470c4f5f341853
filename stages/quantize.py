"""`quantize`: static symmetric INT8 (W8A8) of every Linear, evaluated with real INT8 GEMMs.

1. load the source model + its PruningConfig;
2. activation scales: calibrate on `calibration_batches` training batches run through the model's
   packed pruned runtime (or reuse the scales a quant-aware distill stage observed);
3. convert every nn.Linear to Int8Linear (backend resolved once);
4. optional accuracy-aware fallback: rank Linear layers by quantisation sensitivity (relative
   output error of their fake-quantised version on a calibration batch) and keep the most
   sensitive ones in FP, one at a time, until the validation drop vs the FP model <= max_accuracy_drop;
   (optional `target_flops`: re-fit the thresholds on the INT8 model, so the deployed model runs
   at the FLOPs asked for);
5. evaluate with the real INT8 path (packed runtime) and per-op BOPs precision (Linear 8x8,
   attention matmuls 32x32, or 8x8 with `attention_matmuls: int8`), report which kernel ran,
   write the deployable checkpoint.
"""

from __future__ import annotations


import torch

from ltp_compress.kernels import kernel_counters, reset_kernel_counters
from ltp_compress.modeling.deploy import save_deployable
from ltp_compress.stages import distributed as dist
from ltp_compress.modeling.quantized import (
    attach_int8_attention, calibrate, calibrate_attention, convert_to_int8, fake_quant_weight, fake_quant_per_tensor,
    int8_precision, linear_names, load_act_scales,
)
from ltp_compress.modeling.accounting import Precision
from ltp_compress.tasks.data import length_bucketed_batches
from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.configs import QuantizeStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages.common import evaluate, set_seed
from ltp_compress.stages.flops_target import refit_to_target, target_report



def calibration_batches(ctx: StageContext, n_batches: int, batch_size: int) -> list:
    batches = length_bucketed_batches(ctx.data.train, batch_size, shuffle=True, seed=ctx.seed, pad_token_id=ctx.data.pad_token_id)
    return batches[:n_batches]


def _op_class(name: str) -> str | None:
    if ".attention.self." in name:
        return "qkv_proj"
    if name.endswith("attention.output.dense"):
        return "out_proj"
    if name.endswith("intermediate.dense") or (".layer." in name and name.endswith("output.dense")):
        return "ffn"
    return None  # pooler / classifier: not in the per-token accounting


def precision_for(fp_layers, attention_matmuls: str = "fp32") -> Precision:
    """Linear W8A8 and attention FP32 or INT8, with an op class counted at 32 bits if any of its
    layers was kept in FP by the fallback (conservative)."""
    bits = dict(int8_precision(attention_matmuls).bits)
    for n in fp_layers:
        op = _op_class(n)
        if op:
            bits[op] = (32, 32)
    return Precision(bits)


@torch.no_grad()
def layer_sensitivity(model, batch, pruning, act_scales: dict[str, float], activation_range: str = "full") -> dict[str, float]:
    """Relative output error ||fq(y) - y|| / ||y|| of each Linear on one calibration batch, its
    input (in `activation_range`) and weight fake-quantised with the calibrated scales."""
    from ltp_compress.kernels import act_qmin_of
    from ltp_compress.modeling.pruned_encoder import forward_packed
    import torch.nn.functional as F

    errs: dict[str, float] = {}
    modules = dict(model.named_modules())
    qmin = act_qmin_of(activation_range)

    def hook(name):
        def fn(m, args, out):
            x = args[0]
            yq = F.linear(fake_quant_per_tensor(x, act_scales[name], qmin=qmin), fake_quant_weight(m.weight), m.bias)
            errs[name] = max(errs.get(name, 0.0), float((yq - out).norm() / out.norm().clamp_min(1e-12)))
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in linear_names(model)]
    try:
        forward_packed(model, batch.input_ids, batch.attention_mask, batch.token_type_ids, pruning)
    finally:
        for h in handles:
            h.remove()
    return errs


def quantize_device(backend: str) -> torch.device:
    """Where calibration, conversion and evaluation run: the GPU this process uses for the 'cuda'
    backend (the one GPU backend), else the CPU (every other backend, 'auto' included, is a CPU
    kernel: the deployment target the recipe names explicitly)."""
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("quantize backend 'cuda' needs a CUDA device; torch.cuda.is_available() is False")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run(cfg: QuantizeStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)
    model, tokenizer, pruning = load_stage_model(ctx.source_model, ctx.task)
    model.eval().to(quantize_device(cfg.backend))
    calib = calibration_batches(ctx, cfg.calibration_batches, cfg.calibration_batch_size)
    scale_source = "calibration"
    if cfg.reuse_qat_scales:
        act_scales, scale_source = load_act_scales(ctx.source_model, linear_names(model))
    else:
        act_scales = calibrate(model, calib, pruning, cfg.observer, cfg.percentile)
    attention_scales = {}
    if cfg.attention_matmuls == "int8":  # Q, K, V observed on the float model, like the Linear inputs
        attention_scales = calibrate_attention(model, calib, pruning, cfg.observer, cfg.percentile)

    def convert(fp_layers):
        qmodel, info = convert_to_int8(model, act_scales, cfg.backend, fuse_gelu=cfg.fuse_gelu, fp_layers=fp_layers,
                                       activation_range=cfg.activation_range)
        if attention_scales:
            attach_int8_attention(qmodel, attention_scales)
            info.attention_matmuls, info.attention_scales = "int8", attention_scales
        return qmodel, info

    fp_layers: list[str] = []
    fallback = None
    if cfg.max_accuracy_drop is not None:
        fp_main = validation_main(model, ctx, pruning, cfg.eval_batch_size)
        sens = layer_sensitivity(model, calib[0], pruning, act_scales, cfg.activation_range)
        ranked = sorted(sens, key=sens.get, reverse=True)
        trials = []
        while True:
            qmodel, _ = convert(fp_layers)
            q_main = validation_main(qmodel, ctx, pruning, cfg.eval_batch_size, precision_for(fp_layers, cfg.attention_matmuls))
            drop = fp_main - q_main
            trials.append({"fp_layers": list(fp_layers), "validation_main": q_main, "drop": drop})
            ctx.log.info("%s: %d layer(s) in FP -> validation main %.4f (drop %.4f)", cfg.id, len(fp_layers), q_main, drop)
            if drop <= cfg.max_accuracy_drop or len(fp_layers) >= min(cfg.max_fallback_layers, len(ranked)):
                break
            fp_layers.append(ranked[len(fp_layers)])
        fallback = {"fp_main": fp_main, "budget": cfg.max_accuracy_drop, "sensitivity": sens, "trials": trials,
                    "met_budget": trials[-1]["drop"] <= cfg.max_accuracy_drop}

    qmodel, info = convert(fp_layers)
    info.observer = cfg.observer if scale_source == "calibration" else "qat-ema"
    info.percentile = cfg.percentile if cfg.observer == "percentile" else None
    info.calibration_batches = len(calib) if scale_source == "calibration" else 0
    precision = precision_for(fp_layers, cfg.attention_matmuls)
    # on the INT8 model (what deploys); with several processes decided on rank 0 and broadcast
    pruning, refit = dist.decide_on_main(refit_to_target, qmodel, ctx, pruning, cfg, cfg.eval_batch_size)
    reset_kernel_counters()
    ev = evaluate(qmodel, ctx, pruning, cfg.eval_batch_size, precision=precision)
    counters = kernel_counters()
    ctx.log.info("%s: INT8 backend %s, kernels run: %s", cfg.id, info.backend, counters)
    deploy_dir = ctx.model_out
    if dist.is_main():  # several processes: every rank calibrated and evaluated (its shard), rank 0 writes
        save_deployable(qmodel, tokenizer, pruning, info, deploy_dir, max_seq_length=ctx.max_seq_length)
    extra = {
        "kernel": {"backend": info.backend, "counters": counters},  # this process's (rank 0's evaluation shard)
        "deploy_dir": str(ctx.final_model_dir),
        "act_scale_source": scale_source,
        "observer": info.observer,
        "int8_layers": len(linear_names(model)) - len(fp_layers),
        "fp_layers": fp_layers,
        "attention_matmuls": cfg.attention_matmuls,
        "activation_range": info.activation_range,
        "fused_gelu": len(info.fused_gelu),
        "pruning": pruning.to_dict(),
        "refit": refit,
    }
    if fallback is not None:
        extra["fallback"] = fallback
    result = ev.result(extra)
    if cfg.target_flops is not None:
        result.extra["flops_target"] = target_report(cfg, result)
    return result


def validation_main(model, ctx: StageContext, pruning, batch_size: int, precision: Precision | None = None) -> float:
    """The validation main metric (what the accuracy-aware fallback compares)."""
    return evaluate(model, ctx, pruning, batch_size, splits=[VALIDATION], precision=precision).selection_score
