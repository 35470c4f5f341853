"""Baselines the paper compares against, on the same token-removing runtime:

* `manual_prune` — thresholds rising linearly with depth, θ_l = θ_L·(l+1)/L, nothing learned;
* `topk_prune` — SpAtten-style top-k: the first `dense_layers` layers keep every token, then the
  kept fraction of the original length decays linearly to `final_keep_ratio`.

Both optionally finetune the weights under the fixed rule (`epochs` > 0). With `target_flops` each
lands a relative-FLOPs level on the calibration inputs (never labels) before finetuning: manual by
θ_L (and re-fitted while finetuning, exactly like ltp_hard, since finetuning moves attention),
top-k by its final keep ratio (its token counts depend on the lengths only). That is what makes
"LTP vs manual vs top-k at matched FLOPs, with equal post-pruning budgets" one recipe."""

from __future__ import annotations

import numpy as np

from ltp_compress.errors import UserError
from ltp_compress.modeling.accounting import EncoderShape, relative_flops
from ltp_compress.modeling.pruned_encoder import PruningConfig, linear_threshold_init, topk_keep_ratios, topk_tokens_per_layer
from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.configs import ManualPruneStage, TopkPruneStage
from ltp_compress.stages.context import StageContext, StageResult
from ltp_compress.stages.finetune import train_with_fixed_pruning
from ltp_compress.stages.flops_target import (
    bisect_to_target, calibrate_threshold_offset, flops_probe_batches, probe_batches, target_report,
)
from ltp_compress.stages.ltp_hard import train_to_target
from ltp_compress.stages import distributed as dist


def run_manual(cfg: ManualPruneStage, ctx: StageContext) -> StageResult:
    model, tokenizer, _ = load_stage_model(ctx.source_model, ctx.task)
    L = model.config.num_hidden_layers
    pruning = PruningConfig(mode="threshold", thresholds=linear_threshold_init(L, cfg.final_threshold))
    if cfg.target_flops is None:
        return train_with_fixed_pruning(cfg, ctx, model, tokenizer, pruning)
    # one offset c along the ramp (l+1)/L is θ_L -> θ_L + c: the rule stays linear
    pruning, info = dist.decide_on_main(_fit_manual, model, ctx, pruning, cfg)
    result = train_to_target(cfg, ctx, model, tokenizer, pruning)
    result.extra["initial_fit"] = info
    return result


def _fit_manual(model, ctx: StageContext, pruning: PruningConfig, cfg: ManualPruneStage):
    probe = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 512, cfg.eval_batch_size)
    new, info = calibrate_threshold_offset(model, probe, pruning, cfg.target_flops, cfg.flops_convention)
    info["final_threshold"] = new.thresholds[-1]
    ctx.log.info("%s: θ_L %.4f -> relative FLOPs (%s) %.3f on %s inputs (target %.3f)", cfg.id, new.thresholds[-1],
                 cfg.flops_convention, info["relative_flops"], cfg.flops_calibration_inputs, cfg.target_flops)
    return new, info


def run_topk(cfg: TopkPruneStage, ctx: StageContext) -> StageResult:
    model, tokenizer, _ = load_stage_model(ctx.source_model, ctx.task)
    L = model.config.num_hidden_layers
    ratio, info = cfg.final_keep_ratio, None
    if cfg.target_flops is not None:
        ratio, info = dist.decide_on_main(fit_topk_ratio, model, ctx, cfg)
    pruning = PruningConfig(mode="topk", keep_ratios=topk_keep_ratios(L, ratio, cfg.dense_layers))
    result = train_with_fixed_pruning(cfg, ctx, model, tokenizer, pruning)
    if info is not None:
        result.extra["initial_fit"] = info
        result.extra["flops_target"] = target_report(cfg, result)
    return result


#: smallest final keep ratio the bisection tries (its FLOPs are the floor top-k can reach)
MIN_KEEP_RATIO = 1e-3


def _topk_relative_flops(lengths: np.ndarray, shape: EncoderShape, ratio: float, dense_layers: int, convention: str) -> float:
    """Relative FLOPs of top-k at final keep ratio `ratio` on inputs of these lengths: its token
    counts depend on the lengths only (`topk_tokens_per_layer`), so no forward pass is needed."""
    kept = topk_tokens_per_layer(lengths, topk_keep_ratios(shape.num_layers, ratio, dense_layers))
    return relative_flops(kept, lengths, shape, convention)


def topk_floor_problem(cfg: TopkPruneStage, lengths: np.ndarray, shape: EncoderShape) -> str | None:
    """The error for a `target_flops` below what top-k with `dense_layers` can reach on these
    calibration-input lengths (None if reachable). The runner checks it before any stage runs."""
    floor = _topk_relative_flops(lengths, shape, MIN_KEEP_RATIO, cfg.dense_layers, cfg.flops_convention)
    if floor > cfg.target_flops:
        return (f"stage '{cfg.id}': target_flops {cfg.target_flops} is below what top-k with dense_layers {cfg.dense_layers} "
                f"can reach ({floor:.3f} {cfg.flops_convention} at final_keep_ratio {MIN_KEEP_RATIO} on the "
                f"{cfg.flops_calibration_inputs} inputs): lower dense_layers or raise target_flops")
    return None


def probe_lengths(data, seed: int, cfg: TopkPruneStage) -> np.ndarray:
    """Lengths of the calibration inputs `fit_topk_ratio` measures (the same seeded sample). [N]"""
    return np.concatenate([b.attention_mask.sum(1).numpy() for b in probe_batches(data, seed, cfg.flops_calibration_inputs, 512,
                                                                                   cfg.eval_batch_size)])


def fit_topk_ratio(model, ctx: StageContext, cfg: TopkPruneStage, iters: int = 14) -> tuple[float, dict]:
    """Bisect final_keep_ratio in (0, 1] so relative FLOPs on the calibration inputs ≈ target
    (non-decreasing in the ratio). A target below what `dense_layers` allows is an error naming the keys."""
    shape = EncoderShape.from_config(model.config)
    lengths = probe_lengths(ctx.data, ctx.seed, cfg)

    def at(r: float) -> float:
        return _topk_relative_flops(lengths, shape, r, cfg.dense_layers, cfg.flops_convention)

    problem = topk_floor_problem(cfg, lengths, shape)
    if problem:
        raise UserError(problem)
    hi, lo = bisect_to_target(at, 1.0, MIN_KEEP_RATIO, cfg.target_flops, iters)  # FLOPs rise with the ratio
    ctx.log.info("%s: final_keep_ratio %.4f -> relative FLOPs (%s) %.3f on %s inputs (target %.3f)", cfg.id, lo, cfg.flops_convention,
                 at(lo), cfg.flops_calibration_inputs, cfg.target_flops)
    return lo, {"final_keep_ratio": lo, "relative_flops": at(lo), "convention": cfg.flops_convention,
                "inputs": cfg.flops_calibration_inputs, "sample_examples": int(len(lengths))}
