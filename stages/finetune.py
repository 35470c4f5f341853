"""`finetune`: train the classifier on the task (the teacher). AdamW, linear warmup/decay, evaluate
on the validation split each epoch, keep the best; dev is evaluated once, for the model kept.
Runs under `accelerate launch` unchanged.

`train_with_fixed_pruning` is the same loop with a frozen pruning rule (binary token masks); the
`ltp_hard`, `manual_prune` and `topk_prune` stages use it."""

from __future__ import annotations

import copy

import torch

from ltp_compress.modeling.pruned_encoder import PruningConfig
from ltp_compress.modeling.model_io import load_classifier, load_tokenizer, save_stage_model
from ltp_compress.stages.configs import FinetuneStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages import distributed as dist
from ltp_compress.stages.checkpoint import load_checkpoint, save_checkpoint
from ltp_compress.stages.common import (
    PruningForward, adamw_with_warmup, check_global_batch, check_rank_distill_layers, rank_batches, evaluate, grad_sync,
    load_kd_teacher, make_accelerator, optimizer_step, pruning_stage_loss, rank_distill_on, set_seed, steps_plan, train_batches,
    weight_param_groups, weighted,
)



def run(cfg: FinetuneStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)  # a base model without a head gets a freshly initialised one: seed it
    model = load_classifier(ctx.source_model, ctx.task, log=ctx.log.info)
    tokenizer = load_tokenizer(ctx.source_model)
    result = train_with_fixed_pruning(cfg, ctx, model, tokenizer, PruningConfig())
    result.extra["learned_something"] = check_above_trivial(result.metrics, ctx)
    return result


#: a teacher must beat the trivial predictor on validation by this much (points of the main metric)
MIN_MARGIN_OVER_TRIVIAL = 2.0


def check_above_trivial(metrics: dict, ctx: StageContext) -> dict:
    """Compare the validation main metric with the trivial predictor's (majority class / mean);
    a model not >= MIN_MARGIN_OVER_TRIVIAL points above it is flagged on the console and in the
    report: pruning a model that learned nothing proves nothing."""
    trivial = ctx.data.trivial_baseline[VALIDATION]["main"]
    score = metrics[VALIDATION]["main"]
    margin = 100 * (score - trivial)
    ok = margin >= MIN_MARGIN_OVER_TRIVIAL
    if not ok:
        ctx.log.warning("WARNING: validation main metric %.2f is only %+.2f points above the trivial baseline (%.2f, %s): "
                        "this model learned (almost) nothing; results of pruning it prove nothing", 100 * score, margin,
                        100 * trivial, ctx.data.trivial_baseline[VALIDATION]["predictor"])
    return {"ok": ok, "validation_main": score, "trivial_validation_main": trivial, "margin_points": margin,
            "required_margin_points": MIN_MARGIN_OVER_TRIVIAL}


def train_with_fixed_pruning(cfg, ctx: StageContext, model, tokenizer, pruning: PruningConfig, retarget=None,
                             eligible=None) -> StageResult:
    """Finetune all weights under a frozen pruning rule; evaluate each epoch with the packed
    (token-removing) runtime; keep the best; save to ctx.model_out.

    `retarget(model, pruning, step, total_steps) -> (PruningConfig, info) | None`, if given, is
    called after every step (on rank 0, its decision broadcast) and may replace the rule (ltp_hard's
    `target_flops`). `eligible(cost)`, if given, limits `keep_best` to evaluations whose validation
    cost passes it (ltp_hard: relative FLOPs within the target's tolerance); with none eligible, the
    last weights are kept. Several processes, checkpoints and resume: see stages/distributed.py and
    stages/checkpoint.py."""
    set_seed(ctx.seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    check_global_batch(cfg)
    mode = pruning.masked_mode

    steps_per_epoch = len(train_batches(ctx, cfg.batch_size, 0))
    total_steps, n_epochs = steps_plan(steps_per_epoch, cfg.epochs) if cfg.epochs > 0 else (0, 0)
    opt, sched = adamw_with_warmup(weight_param_groups(model, cfg.weight_decay), cfg.lr, cfg.weight_decay, max(total_steps, 1), cfg.warmup_ratio)
    net, opt = accelerator.prepare(PruningForward(model), opt)
    teacher = load_kd_teacher(cfg, ctx, accelerator.device)
    ranking = rank_distill_on(cfg)
    check_rank_distill_layers(cfg, model.config.num_hidden_layers)

    history, best, best_state, best_pruning, step, start_epoch, retargets, last_loss = [], None, None, None, 0, 0, [], float("nan")
    ckpt = load_checkpoint(ctx.out_dir, cfg, ctx.log)
    if ckpt is not None:
        ckpt.restore(model, {"weights": opt}, sched)
        st = ckpt.state
        history, best, retargets, last_loss = st["history"], st["best"], st["retargets"], st["loss"]
        pruning = PruningConfig.from_dict(st["pruning"])
        best_pruning = PruningConfig.from_dict(st["best_pruning"]) if st["best_pruning"] is not None else None
        best_state = {k[len("best/"):]: v.to(accelerator.device) for k, v in ckpt.tensors.items() if k.startswith("best/")} or None
        step, start_epoch = ckpt.step, ckpt.epoch
        ctx.log.info("%s: resuming from the checkpoint at step %d of %d (epoch %d)", cfg.id, step, total_steps, start_epoch + 1)
    thresholds = pruning.thresholds_tensor
    if thresholds is not None:
        thresholds = thresholds.to(accelerator.device)

    def checkpoint(epoch: int) -> None:
        save_checkpoint(ctx.out_dir, cfg, step=step, epoch=epoch, model=model, optimizers={"weights": opt}, scheduler=sched,
                        tensors={f"best/{k}": v for k, v in (best_state or {}).items()},
                        state={"history": history, "best": best, "retargets": retargets, "loss": last_loss,
                               "pruning": pruning.to_dict(), "best_pruning": best_pruning.to_dict() if best_pruning else None})

    rec = dist.recorder()
    for epoch in range(start_epoch, n_epochs):
        net.train()
        for batch, local in rank_batches(ctx, cfg, epoch, step, steps_per_epoch, total_steps, accelerator.device, rec):
            with grad_sync(accelerator, net):
                with accelerator.autocast():
                    out = net(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                              mode=mode, thresholds=thresholds, keep_ratios=pruning.keep_ratios, return_scores=ranking)
                    loss = pruning_stage_loss(out, batch, teacher, cfg, ctx.task.num_labels).total
                optimizer_step(accelerator, net, weighted(loss, local.example_weight), cfg.max_grad_norm, [opt], sched)
            step += 1
            last_loss = loss.item()
            if retarget is not None:
                new = dist.decide_on_main(retarget, model, pruning, step, total_steps)
                if new is not None:
                    pruning, info = new
                    thresholds = torch.tensor(pruning.thresholds, device=accelerator.device)
                    retargets.append({"step": step, **info})
                    net.train()
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < total_steps:
                checkpoint(epoch)
            dist.maybe_fail(cfg.id, step)
        if cfg.eval_every_epoch or epoch == n_epochs - 1:
            ev = evaluate(model, ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION])
            score, rel = ev.selection_score, ev.validation_cost["relative_flops"]
            history.append({"epoch": epoch + 1, "step": step, "loss": last_loss, "validation": ev.metrics[VALIDATION],
                            "validation_relative_flops": rel})
            ctx.log.info("%s epoch %d: loss %.4f, validation main %.4f, relative FLOPs %.3f", cfg.id, epoch + 1, last_loss, score, rel)
            if cfg.keep_best and (eligible is None or eligible(ev.validation_cost)) and (best is None or score > best):
                best, best_state, best_pruning = score, copy.deepcopy(model.state_dict()), pruning

    final = model
    if cfg.keep_best and best_state is not None:
        final.load_state_dict(best_state)
        pruning = best_pruning
    ev = evaluate(final, ctx, pruning, cfg.eval_batch_size)
    if dist.is_main():
        save_stage_model(final, tokenizer, pruning, ctx.model_out)
    extra = {"history": history, "train_steps": step, "pruning": pruning.to_dict()}
    if retarget is not None:
        extra["retargets"] = retargets
    return ev.result(extra)
