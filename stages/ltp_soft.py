"""`ltp_soft`: Learned Token Pruning, soft phase (Kim et al. KDD'22, Eq. 11-12).

Each layer's output is multiplied by m_l = sigmoid((score_l - θ_l)/T) (cumulative over layers,
so a token pruned earlier stays pruned), thresholds θ_l are parameters with their own Adam
learning rate, and the loss is

    loss = task_loss + λ · (1/L) Σ_l mean_{real tokens}(m_l)

(with `kd_teacher`, task_loss is kd_alpha·CE + (1-kd_alpha)·logit KD from the unpruned teacher).

With `target_flops` the target is reached during training (`flops_controller`; measured with
hard thresholds on a fixed input sample, ~16 times per epoch). A FLOPs schedule falls linearly
from the start's FLOPs to the target over the first `anneal_until` of the steps and is flat after.
With `lambda_with_ceiling` λ is steered towards the target (bounded, as the first
versions did: the gradient decides which layers and tokens prune) and whenever the FLOPs are
above the schedule one offset along the linear ramp, θ_l + c·(l+1)/L, puts them back on it
(`flops_target.ScheduleFollower`), so a task where λ alone stalls still reaches the target;
`lambda_with_bounds` (the default) is the same with a floor as well: FLOPs that fall below the target by more
than the tolerance are moved back up to it (λ alone cannot un-prune quickly: the thresholds keep
their Adam momentum, and a soft phase trained on short inputs overshot to 0.29 for a 0.40 target);
`annealed_target` moves the thresholds onto the schedule both ways with λ fixed; `lambda` is λ
steering alone. At the end one offset along the ramp is bisected so the final relative FLOPs
lands on the target (in the stage's `flops_convention`); what that correction cost on validation
is reported, with a warning above `max_correction_points`, and so is a target training did not
reach. Both use inputs only, never labels: by default the
validation split's inputs (whole sentences, like dev, where SST-2's training phrases are half as
long), or a training sample, or — as an explicit choice — the dev inputs as unlabelled deployment
inputs. The saved model runs with the hard rule score > θ_l.
"""

from __future__ import annotations

import numpy as np
import torch

from ltp_compress.modeling.pruned_encoder import PruningConfig, linear_threshold_init
from ltp_compress.modeling.model_io import load_stage_model, save_stage_model
from ltp_compress.stages.configs import LTPSoftStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages import distributed as dist
from ltp_compress.stages.checkpoint import load_checkpoint, save_checkpoint
from ltp_compress.stages.common import (
    PruningForward, adamw_with_warmup, check_global_batch, check_rank_distill_layers, rank_batches, evaluate, grad_sync,
    load_kd_teacher, make_accelerator, optimizer_step, pruning_stage_loss, rank_distill_on, set_seed, steps_plan, train_batches,
    weight_param_groups, weighted,
)
from ltp_compress.stages.flops_target import (
    ScheduleFollower, annealed_target, calibrate_threshold_offset, flops_probe_batches, relative_flops_on, target_report, within_target,
)


def run(cfg: LTPSoftStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    check_global_batch(cfg)
    model, tokenizer, _ = load_stage_model(ctx.source_model, ctx.task)
    L = model.config.num_hidden_layers
    # the thresholds live in the module DDP wraps: their gradients are all-reduced like the weights'
    inner = PruningForward(model, torch.nn.Parameter(torch.tensor(linear_threshold_init(L, cfg.final_threshold))))
    thresholds = inner.thresholds
    lam = cfg.lambda_

    steps_per_epoch = len(train_batches(ctx, cfg.batch_size, 0))
    total_steps, n_epochs = steps_plan(steps_per_epoch, cfg.epochs)
    opt, sched = adamw_with_warmup(weight_param_groups(model, cfg.weight_decay), cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    th_opt = torch.optim.Adam([thresholds], lr=cfg.threshold_lr)
    net, opt, th_opt = accelerator.prepare(inner, opt, th_opt)
    weights = [p for p in model.parameters()]  # gradient clipping: the weights only, as on one process
    teacher = load_kd_teacher(cfg, ctx, accelerator.device)
    ranking = rank_distill_on(cfg)
    check_rank_distill_layers(cfg, L)

    probe = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 256, cfg.eval_batch_size) if cfg.target_flops else None
    control_every = max(1, total_steps // (16 * n_epochs)) if cfg.target_flops else None  # ~16 probes per epoch

    controller = cfg.flops_controller if cfg.target_flops else None
    scheduled = controller in ("annealed_target", "lambda_with_ceiling", "lambda_with_bounds")  # a FLOPs schedule with threshold moves
    steered = controller in ("lambda_with_ceiling", "lambda_with_bounds")  # λ steered towards the target as well
    follower = (ScheduleFollower(probe, cfg.flops_convention, cfg.target_tolerance / 2, ceiling_only=steered,
                                 floor=cfg.target_flops if controller == "lambda_with_bounds" else None)
                if scheduled else None)
    control = {"flops_start": None, "moves": []}  # annealed_target: the schedule's start and every threshold move

    history, step, start_epoch = [], 0, 0
    last = {"loss": float("nan"), "task_loss": float("nan"), "mask_mean": float("nan")}
    optimizers = {"weights": opt, "thresholds": th_opt}
    ckpt = load_checkpoint(ctx.out_dir, cfg, ctx.log)
    if ckpt is not None:
        ckpt.restore(model, optimizers, sched)
        with torch.no_grad():
            thresholds.copy_(ckpt.tensors["thresholds"].to(thresholds.device))
        history, lam, last, step, start_epoch = ckpt.state["history"], ckpt.state["lambda"], ckpt.state["last"], ckpt.step, ckpt.epoch
        control = ckpt.state.get("control", control)
        if follower is not None:
            follower.slope = control.get("slope")
        ctx.log.info("%s: resuming from the checkpoint at step %d of %d (epoch %d)", cfg.id, step, total_steps, start_epoch + 1)

    def steer(lam: float) -> float:
        rel = relative_flops_on(model, probe, _pruning(thresholds), cfg.flops_convention)
        return _steer_lambda(lam, rel, cfg.target_flops, cfg.lambda_)

    def follow_schedule(lam: float) -> float:  # thresholds moved onto the FLOPs schedule (rank 0 decides); returns λ
        target_now = annealed_target(control["flops_start"], cfg.target_flops, step, total_steps, cfg.anneal_until)
        new, info = dist.decide_on_main(follower, model, _pruning(thresholds), target_now)
        if new is not None:
            with torch.no_grad():
                thresholds.copy_(torch.tensor(new, dtype=thresholds.dtype, device=thresholds.device))
        control["slope"] = follower.slope
        control["moves"].append({"step": step, **info})
        if steered:  # λ steered towards the target (as 'lambda'), from the FLOPs the move left
            lam = _steer_lambda(lam, info.get("relative_flops_after", info["relative_flops"]), cfg.target_flops, cfg.lambda_)
        return lam

    if scheduled and control["flops_start"] is None:
        control["flops_start"] = dist.decide_on_main(relative_flops_on, model, probe, _pruning(thresholds), cfg.flops_convention)
        ctx.log.info("%s: FLOPs schedule %.3f -> %.3f (%s) over the first %.0f%% of %d steps", cfg.id, control["flops_start"],
                     cfg.target_flops, cfg.flops_convention, 100 * cfg.anneal_until, total_steps)

    rec = dist.recorder()
    for epoch in range(start_epoch, n_epochs):
        net.train()
        for batch, local in rank_batches(ctx, cfg, epoch, step, steps_per_epoch, total_steps, accelerator.device, rec):
            with grad_sync(accelerator, net):
                with accelerator.autocast():
                    out = net(batch.input_ids, batch.attention_mask, batch.token_type_ids, mode="soft", temperature=cfg.temperature,
                              return_scores=ranking)
                    stage_loss = pruning_stage_loss(out, batch, teacher, cfg, ctx.task.num_labels)
                    loss_task = stage_loss.total
                    real = batch.attention_mask.to(out.soft_masks[0].dtype)  # [b, s]
                    mask_mean = torch.stack([(m * real).sum() / real.sum() for m in out.soft_masks]).mean()
                    # example / token weights: DDP's average is the global batch's loss gradient
                    loss = weighted(loss_task, local.example_weight) + weighted(lam * mask_mean, local.token_weight)
                optimizer_step(accelerator, net, loss, cfg.max_grad_norm, [opt, th_opt], sched, clip_params=weights)
            step += 1
            last = {"loss": loss.item(), "task_loss": loss_task.item(), "mask_mean": mask_mean.item(),
                    "rank_loss": None if stage_loss.rank is None else stage_loss.rank.item()}
            if control_every and step % control_every == 0:
                if scheduled:
                    lam = follow_schedule(lam)
                else:
                    lam = dist.decide_on_main(steer, lam)  # λ decided once (rank 0), broadcast
                net.train()
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < total_steps:
                save_checkpoint(ctx.out_dir, cfg, step=step, epoch=epoch, model=model, optimizers=optimizers, scheduler=sched,
                                tensors={"thresholds": thresholds}, state={"history": history, "lambda": lam, "last": last, "control": control})
            dist.maybe_fail(cfg.id, step)
        if not dist.grad_sync_disabled():
            dist.check_identical(thresholds, f"{cfg.id}: thresholds after epoch {epoch + 1}")
        pruning = _pruning(thresholds)
        ev = evaluate(model, ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION])
        rel = ev.validation_cost["by_convention"][cfg.flops_convention]["relative_flops"]
        history.append({"epoch": epoch + 1, "step": step, "loss": last["loss"], "task_loss": last["task_loss"],
                        "mask_mean": last["mask_mean"], "rank_loss": last.get("rank_loss"), "lambda": lam, "thresholds": pruning.thresholds,
                        "validation": ev.metrics[VALIDATION], "validation_main": ev.selection_score,
                        "validation_relative_flops": rel, "flops_convention": cfg.flops_convention})
        ctx.log.info("%s epoch %d: loss %.4f, mask %.3f, λ %.4g, validation main %.4f, relative FLOPs (%s) %.3f, θ %s",
                     cfg.id, epoch + 1, last["loss"], last["mask_mean"], lam, ev.selection_score, cfg.flops_convention, rel,
                     np.round(pruning.thresholds, 3).tolist())

    final = model
    pruning = _pruning(thresholds)
    calibration = None
    if cfg.target_flops:
        sample = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 1024, cfg.eval_batch_size)
        # what training reached: the last epoch's validation evaluation, before the correction
        before = {"thresholds": pruning.thresholds, "validation_relative_flops": history[-1]["validation_relative_flops"],
                  "validation_main": history[-1]["validation_main"]}
        calibration = {"controller": controller, "before": before,
                       "reached_target_before_correction": within_target(before["validation_relative_flops"], cfg.target_flops,
                                                                         cfg.target_tolerance)}
        if scheduled:
            calibration["schedule"] = control
        # decided once (rank 0), broadcast
        pruning, found = dist.decide_on_main(calibrate_threshold_offset, final, sample, pruning, cfg.target_flops, cfg.flops_convention)
        calibration.update(found, inputs=cfg.flops_calibration_inputs)
        ctx.log.info("%s: thresholds offset by %.4f·(l+1)/L to reach relative FLOPs (%s) %.3f on %s inputs", cfg.id,
                     calibration["offset"], cfg.flops_convention, calibration["relative_flops"], cfg.flops_calibration_inputs)
    ev = evaluate(final, ctx, pruning, cfg.eval_batch_size)
    if calibration is not None:
        _report_correction(cfg, ctx, calibration, ev.selection_score)
    if dist.is_main():
        save_stage_model(final, tokenizer, pruning, ctx.model_out)
    result = ev.result({"history": history, "train_steps": step, "final_lambda": lam, "pruning": pruning.to_dict(),
                        "calibration": calibration})
    if cfg.target_flops:
        result.extra["flops_target"] = target_report(cfg, result)
    return result


def _report_correction(cfg: LTPSoftStage, ctx: StageContext, calibration: dict, validation_main_after: float) -> None:
    """What the end-of-stage offset cost on validation, and the warnings a user must see: a
    target training did not reach, a correction above `max_correction_points`."""
    before = calibration["before"]
    cost = 100 * (before["validation_main"] - validation_main_after)
    calibration.update(validation_main_after=validation_main_after, correction_cost_points=cost, warnings=[])
    if not calibration["reached_target_before_correction"]:
        calibration["warnings"].append(
            f"training did not reach the FLOPs target: relative FLOPs {before['validation_relative_flops']:.3f} on validation at the "
            f"end of training vs target {cfg.target_flops:.3f} ± {100 * cfg.target_tolerance:.0f}% ({calibration['controller']} "
            f"controller); the end-of-stage offset moved the thresholds the rest of the way")
    if cost > cfg.max_correction_points:
        calibration["warnings"].append(
            f"the end-of-stage FLOPs correction cost {cost:.2f} validation points (> max_correction_points "
            f"{cfg.max_correction_points:g}): validation main {before['validation_main']:.4f} -> {validation_main_after:.4f}; "
            f"a longer soft phase (epochs) or an earlier anneal (anneal_until) leaves training closer to the target")
    for w in calibration["warnings"]:
        ctx.log.warning("%s: WARNING: %s", cfg.id, w)


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
