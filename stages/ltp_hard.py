"""`ltp_hard`: thresholds learned by `ltp_soft` are frozen, the mask is binary (score > θ_l), and
all weights are finetuned again under it.

Finetuning changes the attention patterns, so with frozen thresholds the relative FLOPs drifts
upwards (without the λ pressure attention spreads out again; the run that showed it is in
benchmarks/results/design_observations.md). With `target_flops`, the thresholds are re-fitted a few times
during the first `retarget_until` fraction of the steps, by the same one-offset move along the
linear ramp that `ltp_soft` uses at its end (inputs only, never labels), and are frozen for the
rest of training, so the weights finish adapting to the final thresholds. `keep_best` then only
chooses among evaluated checkpoints (each with the thresholds it was evaluated with) whose
validation relative FLOPs (in the stage's `flops_convention`) is within `target_tolerance` of the
target."""

from __future__ import annotations

import numpy as np

from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.configs import LTPHardStage
from ltp_compress.stages.context import StageContext, StageResult
from ltp_compress.stages.finetune import train_with_fixed_pruning
from ltp_compress.stages.flops_target import calibrate_threshold_offset, flops_probe_batches, target_report, within_target


def run(cfg: LTPHardStage, ctx: StageContext) -> StageResult:
    model, tokenizer, pruning = load_stage_model(ctx.source_model, ctx.task)
    if pruning.mode != "threshold":
        raise ValueError(f"{cfg.id}: source model {ctx.source_model} has no learned thresholds (pruning mode '{pruning.mode}')")
    return train_to_target(cfg, ctx, model, tokenizer, pruning)


def train_to_target(cfg, ctx: StageContext, model, tokenizer, pruning) -> StageResult:
    """Finetune under a threshold rule; with `cfg.target_flops`, re-fit the thresholds a few times
    during the first `retarget_until` of the steps and keep_best only among evaluations that meet
    the target (ltp_hard, and manual_prune at a FLOPs level)."""
    retarget = None
    if cfg.target_flops is not None:
        probe = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 512, cfg.eval_batch_size)

        def retarget(m, current, step, total):
            every = max(1, int(total * cfg.retarget_until) // cfg.retargets)
            if step % every or step > total * cfg.retarget_until:
                return None
            new, info = calibrate_threshold_offset(m, probe, current, cfg.target_flops, cfg.flops_convention)
            ctx.log.info("%s step %d: thresholds re-fitted (offset %+.4f) -> relative FLOPs %.3f on %s inputs: θ %s", cfg.id, step,
                         info["offset"], info["relative_flops"], cfg.flops_calibration_inputs, np.round(new.thresholds, 3).tolist())
            return new, info

    def meets_target(cost: dict) -> bool:  # keep_best only among checkpoints that meet the FLOPs target
        return within_target(cost["by_convention"][cfg.flops_convention]["relative_flops"], cfg.target_flops, cfg.target_tolerance)

    result = train_with_fixed_pruning(cfg, ctx, model, tokenizer, pruning, retarget=retarget,
                                      eligible=meets_target if cfg.target_flops is not None else None)
    if cfg.target_flops is not None:
        result.extra["flops_target"] = target_report(cfg, result)
    return result
