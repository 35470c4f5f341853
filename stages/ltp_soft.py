"""`ltp_soft`: Learned Token Pruning, soft phase (Kim et al. KDD'22, Eq. 11-12).

Each layer's output is multiplied by m_l = sigmoid((score_l - θ_l)/T) (cumulative over layers,
so a token pruned earlier stays pruned), thresholds θ_l are parameters with their own Adam
learning rate, and the loss is

    loss = task_loss + λ · (1/L) Σ_l mean_{real tokens}(m_l)

(with `kd_teacher`, task_loss is kd_alpha·CE + (1-kd_alpha)·logit KD from the unpruned teacher).

With `target_flops`, λ is steered during training towards that relative FLOPs (measured with
hard thresholds on a fixed input sample, ~16 times per epoch), and at the end one offset along
the linear ramp, θ_l + c·(l+1)/L, is bisected so the final relative FLOPs lands on the target
(in the stage's `flops_convention`). Both use inputs only, never labels: by default the
validation split's inputs (whole sentences, like dev, where SST-2's training phrases are half as
long), or a training sample, or — as an explicit choice — the dev inputs as unlabelled deployment
inputs. The saved model runs with the hard rule score > θ_l.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_masked, linear_threshold_init
from ltp_compress.modeling.model_io import load_stage_model, save_stage_model
from ltp_compress.stages.configs import LTPSoftStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages.common import (
    adamw_with_warmup, evaluate, load_kd_teacher, optimizer_step, make_accelerator, pruning_stage_loss, set_seed,
    shard, steps_plan, train_batches, weight_param_groups,
)
from ltp_compress.stages.flops_target import calibrate_threshold_offset, flops_probe_batches, relative_flops_on, target_report


def run(cfg: LTPSoftStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    model, tokenizer, _ = load_stage_model(ctx.source_model, ctx.task)
    L = model.config.num_hidden_layers
    thresholds = torch.nn.Parameter(torch.tensor(linear_threshold_init(L, cfg.final_threshold)))
    lam = cfg.lambda_

    n_batches = len(shard(train_batches(ctx, cfg.batch_size, 0), accelerator))
    total_steps, n_epochs = steps_plan(n_batches, cfg.epochs)
    opt, sched = adamw_with_warmup(weight_param_groups(model, cfg.weight_decay), cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    th_opt = torch.optim.Adam([thresholds], lr=cfg.threshold_lr)
    model, opt, sched, th_opt = accelerator.prepare(model, opt, sched, th_opt)
    thresholds.data = thresholds.data.to(accelerator.device)
    teacher = load_kd_teacher(cfg, ctx, accelerator.device)

    probe = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 256, cfg.eval_batch_size) if cfg.target_flops else None
    control_every = max(1, total_steps // (16 * n_epochs)) if cfg.target_flops else None  # ~16 probes per epoch

    history, step = [], 0
    for epoch in range(n_epochs):
        model.train()
        batches = shard(train_batches(ctx, cfg.batch_size, epoch), accelerator)
        for batch in tqdm(batches, desc=f"{cfg.id} epoch {epoch + 1}", disable=not ctx.progress):
            if step >= total_steps:
                break
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                out = forward_masked(model, batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                     mode="soft", thresholds=thresholds, temperature=cfg.temperature)
                loss_task = pruning_stage_loss(out.logits, batch, teacher, cfg, ctx.task.num_labels)
                real = batch.attention_mask.to(out.soft_masks[0].dtype)  # [b, s]
                mask_mean = torch.stack([(m * real).sum() / real.sum() for m in out.soft_masks]).mean()
                loss = loss_task + lam * mask_mean
            optimizer_step(accelerator, model, loss, cfg.max_grad_norm, [opt, th_opt], sched)
            step += 1
            if control_every and step % control_every == 0:
                rel = relative_flops_on(accelerator.unwrap_model(model), probe, _pruning(thresholds), cfg.flops_convention)
                lam = _steer_lambda(lam, rel, cfg.target_flops, cfg.lambda_)
                model.train()
        pruning = _pruning(thresholds)
        ev = evaluate(accelerator.unwrap_model(model), ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION])
        rel = ev.validation_cost["by_convention"][cfg.flops_convention]["relative_flops"]
        history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(), "task_loss": loss_task.item(),
                        "mask_mean": mask_mean.item(), "lambda": lam, "thresholds": pruning.thresholds,
                        "validation": ev.metrics[VALIDATION], "validation_relative_flops": rel, "flops_convention": cfg.flops_convention})
        ctx.log.info("%s epoch %d: loss %.4f, mask %.3f, λ %.4g, validation main %.4f, relative FLOPs (%s) %.3f, θ %s",
                     cfg.id, epoch + 1, loss.item(), mask_mean.item(), lam, ev.selection_score, cfg.flops_convention, rel,
                     np.round(pruning.thresholds, 3).tolist())

    final = accelerator.unwrap_model(model)
    pruning = _pruning(thresholds)
    calibration = None
    if cfg.target_flops:
        sample = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 1024, cfg.eval_batch_size)
        calibration = {"before": {"thresholds": pruning.thresholds}}
        pruning, found = calibrate_threshold_offset(final, sample, pruning, cfg.target_flops, cfg.flops_convention)
        calibration.update(found, inputs=cfg.flops_calibration_inputs)
        ctx.log.info("%s: thresholds offset by %.4f·(l+1)/L to reach relative FLOPs (%s) %.3f on %s inputs", cfg.id,
                     calibration["offset"], cfg.flops_convention, calibration["relative_flops"], cfg.flops_calibration_inputs)
    ev = evaluate(final, ctx, pruning, cfg.eval_batch_size)
    if accelerator.is_main_process:
        save_stage_model(final, tokenizer, pruning, ctx.model_out)
    result = ev.result({"history": history, "train_steps": step, "final_lambda": lam, "pruning": pruning.to_dict(),
                        "calibration": calibration})
    if cfg.target_flops:
        result.extra["flops_target"] = target_report(cfg, result)
    return result


def _pruning(thresholds: torch.Tensor) -> PruningConfig:
    return PruningConfig(mode="threshold", thresholds=[float(t) for t in thresholds.detach().cpu()])


def _steer_lambda(lam: float, rel: float, target: float, lam0: float, gain: float = 1.0) -> float:
    """Bounded multiplicative controller: more FLOPs than the target -> larger λ, and vice versa,
    at most x1.25 / x0.8 per probe and within [λ0/10, 10·λ0]. The per-probe bound is what keeps it
    stable: thresholds move slowly (Adam, one threshold_lr per step), so an unbounded controller
    winds up: a burst of large λ saturates the sigmoid masks (m ≈ 0 carries no gradient), the
    thresholds overshoot and never come back, and accuracy collapses. (Why the cap is 10·λ0:
    benchmarks/results/design_observations.md.) The final offset
    calibration (`flops_target.calibrate_threshold_offset`) lands the target; λ steering brings training
    close to it so that the calibration is a small move."""
    factor = float(np.clip((rel / target) ** gain, 0.8, 1.25))
    return float(np.clip(lam * factor, lam0 / 10, lam0 * 10))
