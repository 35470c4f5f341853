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

from ltp_compress.errors import UserError
from ltp_compress.modeling.pruned_encoder import PruningConfig, linear_threshold_init, topk_keep_ratios
from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.configs import ManualPruneStage, TopkPruneStage
from ltp_compress.stages.context import StageContext, StageResult
from ltp_compress.stages.finetune import train_with_fixed_pruning
from ltp_compress.stages.flops_target import calibrate_threshold_offset, flops_probe_batches, relative_flops_on, target_report
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


def fit_topk_ratio(model, ctx: StageContext, cfg: TopkPruneStage, iters: int = 14) -> tuple[float, dict]:
    """Bisect final_keep_ratio in (0, 1] so relative FLOPs on the calibration inputs ≈ target
    (non-decreasing in the ratio). A target below what `dense_layers` allows is an error naming the keys."""
    L = model.config.num_hidden_layers
    probe = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 512, cfg.eval_batch_size)

    def at(r: float) -> float:
        return relative_flops_on(model, probe, PruningConfig(mode="topk", keep_ratios=topk_keep_ratios(L, r, cfg.dense_layers)),
                                 cfg.flops_convention)

    lo, hi = 1e-3, 1.0
    floor = at(lo)
    if floor > cfg.target_flops:
        raise UserError(f"stage '{cfg.id}': target_flops {cfg.target_flops} is below what top-k with dense_layers {cfg.dense_layers} "
                        f"can reach ({floor:.3f} {cfg.flops_convention} at final_keep_ratio {lo}): lower dense_layers or raise target_flops")
    for _ in range(iters):
        mid = (lo + hi) / 2
        if at(mid) > cfg.target_flops:
            hi = mid
        else:
            lo = mid
    ctx.log.info("%s: final_keep_ratio %.4f -> relative FLOPs (%s) %.3f on %s inputs (target %.3f)", cfg.id, lo, cfg.flops_convention,
                 at(lo), cfg.flops_calibration_inputs, cfg.target_flops)
    return lo, {"final_keep_ratio": lo, "relative_flops": at(lo), "convention": cfg.flops_convention,
                "inputs": cfg.flops_calibration_inputs, "sample_examples": sum(b.input_ids.shape[0] for b in probe)}
