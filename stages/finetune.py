"""`finetune`: train the classifier on the task (the teacher). AdamW, linear warmup/decay, evaluate
on the validation split each epoch, keep the best; dev is evaluated once, for the model kept.
Runs under `accelerate launch` unchanged.

`train_with_fixed_pruning` is the same loop with a frozen pruning rule (binary token masks); the
`ltp_hard`, `manual_prune` and `topk_prune` stages use it."""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_masked
from ltp_compress.modeling.model_io import load_classifier, load_tokenizer, save_stage_model
from ltp_compress.stages.configs import FinetuneStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages.common import (
    adamw_with_warmup, evaluate, load_kd_teacher, optimizer_step, make_accelerator, pruning_stage_loss,
    set_seed, shard, steps_plan, train_batches, weight_param_groups,
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
    called after every step and may replace the rule (ltp_hard's `target_flops`). `eligible(cost)`,
    if given, limits `keep_best` to evaluations whose validation cost passes it (ltp_hard: relative
    FLOPs within the target's tolerance); with none eligible, the last weights are kept."""
    set_seed(ctx.seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    mode = pruning.masked_mode
    thresholds = pruning.thresholds_tensor

    n_batches = len(shard(train_batches(ctx, cfg.batch_size, 0), accelerator))
    total_steps, n_epochs = steps_plan(n_batches, cfg.epochs) if cfg.epochs > 0 else (0, 0)
    opt, sched = adamw_with_warmup(weight_param_groups(model, cfg.weight_decay), cfg.lr, cfg.weight_decay, max(total_steps, 1), cfg.warmup_ratio)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    if thresholds is not None:
        thresholds = thresholds.to(accelerator.device)
    teacher = load_kd_teacher(cfg, ctx, accelerator.device)

    history, best, best_state, step, retargets = [], None, None, 0, []
    for epoch in range(n_epochs):
        model.train()
        batches = shard(train_batches(ctx, cfg.batch_size, epoch), accelerator)
        for batch in tqdm(batches, desc=f"{cfg.id} epoch {epoch + 1}", disable=not ctx.progress):
            if step >= total_steps:
                break
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                out = forward_masked(model, batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                     mode=mode, thresholds=thresholds, keep_ratios=pruning.keep_ratios)
                loss = pruning_stage_loss(out.logits, batch, teacher, cfg, ctx.task.num_labels)
            optimizer_step(accelerator, model, loss, cfg.max_grad_norm, [opt], sched)
            step += 1
            if retarget is not None:
                new = retarget(accelerator.unwrap_model(model), pruning, step, total_steps)
                if new is not None:
                    pruning, info = new
                    thresholds = torch.tensor(pruning.thresholds, device=accelerator.device)
                    retargets.append({"step": step, **info})
                    model.train()
        if cfg.eval_every_epoch or epoch == n_epochs - 1:
            ev = evaluate(accelerator.unwrap_model(model), ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION])
            score, rel = ev.selection_score, ev.validation_cost["relative_flops"]
            history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(), "validation": ev.metrics[VALIDATION],
                            "validation_relative_flops": rel})
            ctx.log.info("%s epoch %d: loss %.4f, validation main %.4f, relative FLOPs %.3f", cfg.id, epoch + 1, loss.item(), score, rel)
            if cfg.keep_best and (eligible is None or eligible(ev.validation_cost)) and (best is None or score > best):
                best, best_state, best_pruning = score, copy.deepcopy(accelerator.unwrap_model(model).state_dict()), pruning

    final = accelerator.unwrap_model(model)
    if cfg.keep_best and best_state is not None:
        final.load_state_dict(best_state)
        pruning = best_pruning
    ev = evaluate(final, ctx, pruning, cfg.eval_batch_size)
    if accelerator.is_main_process:
        save_stage_model(final, tokenizer, pruning, ctx.model_out)
    extra = {"history": history, "train_steps": step, "pruning": pruning.to_dict()}
    if retarget is not None:
        extra["retargets"] = retargets
    return ev.result(extra)
