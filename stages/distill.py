"""`distill`: knowledge distillation from the unpruned FP teacher into the pruned student.

The student (the model in ctx.source_model, normally the ltp_hard output) trains under its frozen
pruning rule (binary masks, `forward_masked` mode "hard" / "topk" from its PruningConfig); the
teacher (model of stage `cfg.teacher`) runs dense, in eval mode, without gradients.

    loss = α·task + (1-α)·(logit_weight·KD_logit + embedding_weight·KD_emb)
    KD_logit = T² · KL(softmax(t/T) || softmax(s/T))   (batch mean)     classification
             = MSE(s, t)                                                 regression (num_labels 1)
    KD_emb   = mean over real tokens and features of (e_s - e_t)²  (embedding-layer outputs)

`quant_aware`: every nn.Linear of the student runs INT8 fake quantisation with a straight-through
estimator (modeling.quantized.QATLinear: per-channel symmetric weights, per-tensor symmetric
activations with EMA-observed scales), so it learns its quantised self; dev evaluation during
training runs fake-quantised too. The saved model holds plain float weights, and the observed
activation scales go to `model/act_scales.json` (the quantize stage's `reuse_qat_scales`).
Same loop conventions as finetune (accelerate, AdamW + warmup, validation each epoch, keep best).
With `target_flops`, the thresholds are re-fitted at the end (one offset along the ramp, on the
calibration inputs), because training moves the FLOPs the frozen thresholds give.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from ltp_compress.modeling.pruned_encoder import forward_masked
from ltp_compress.modeling.quantized import QATLinear, QMAX, disable_qat, enable_qat, save_act_scales
from ltp_compress.modeling.model_io import load_stage_model, save_stage_model
from ltp_compress.stages.configs import DistillStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages.flops_target import refit_to_target, target_report
from ltp_compress.stages.common import (
    adamw_with_warmup, evaluate, kd_logit_loss, optimizer_step, make_accelerator, set_seed, shard, steps_plan,
    task_loss, train_batches, weight_param_groups,
)



def embedding_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of embedding-layer outputs [b, s, d], averaged over real tokens (mask 1) and features."""
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(f"embedding shapes differ: student {tuple(student_emb.shape)}, teacher {tuple(teacher_emb.shape)}")
    sq = (student_emb.float() - teacher_emb.float()).pow(2)  # [b, s, d]
    if attention_mask is None:
        return sq.mean()
    m = attention_mask.to(sq.dtype).unsqueeze(-1)  # [b, s, 1]
    return (sq * m).sum() / (m.sum() * sq.shape[-1]).clamp_min(1.0)


def distill_loss(student_out, teacher_out, labels, attention_mask, num_labels: int, cfg) -> tuple[torch.Tensor, dict]:
    """The stage's total loss and its parts (floats, for logging)."""
    lt = task_loss(student_out.logits, labels, num_labels)
    lk = kd_logit_loss(student_out.logits, teacher_out.logits, cfg.kd_temperature)
    le = embedding_loss(student_out.embeddings, teacher_out.embeddings, attention_mask)
    kd = cfg.logit_weight * lk + cfg.embedding_weight * le
    loss = cfg.alpha * lt + (1 - cfg.alpha) * kd
    return loss, {"task": lt.item(), "kd_logit": lk.item(), "kd_embedding": le.item()}


def run(cfg: DistillStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    model, tokenizer, pruning = load_stage_model(ctx.source_model, ctx.task)
    teacher_dir = ctx.model_source_of(cfg.teacher)
    teacher, _, _ = load_stage_model(teacher_dir, ctx.task)
    teacher.eval().requires_grad_(False)
    mode = pruning.masked_mode
    thresholds = pruning.thresholds_tensor
    if cfg.quant_aware:
        enable_qat(model)

    n_batches = len(shard(train_batches(ctx, cfg.batch_size, 0), accelerator))
    total_steps, n_epochs = steps_plan(n_batches, cfg.epochs)
    opt, sched = adamw_with_warmup(weight_param_groups(model, cfg.weight_decay), cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    teacher.to(accelerator.device)
    if thresholds is not None:
        thresholds = thresholds.to(accelerator.device)

    history, best, best_state, best_scales, step, parts = [], None, None, None, 0, {}
    loss = torch.tensor(float("nan"))
    for epoch in range(n_epochs):
        model.train()
        batches = shard(train_batches(ctx, cfg.batch_size, epoch), accelerator)
        for batch in tqdm(batches, desc=f"{cfg.id} epoch {epoch + 1}", disable=not ctx.progress):
            if step >= total_steps:
                break
            batch = batch.to(accelerator.device)
            with torch.no_grad():
                t_out = forward_masked(teacher, batch.input_ids, batch.attention_mask, batch.token_type_ids, mode="dense")
            with accelerator.autocast():
                s_out = forward_masked(model, batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                       mode=mode, thresholds=thresholds, keep_ratios=pruning.keep_ratios)
                loss, parts = distill_loss(s_out, t_out, batch.labels, batch.attention_mask, ctx.task.num_labels, cfg)
            optimizer_step(accelerator, model, loss, cfg.max_grad_norm, [opt], sched)
            step += 1
        if cfg.eval_every_epoch or epoch == n_epochs - 1:
            # quant-aware: this evaluates the fake-quantised student (what INT8 will deploy)
            ev = evaluate(accelerator.unwrap_model(model), ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION])
            score = ev.selection_score
            history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(), **parts, "validation": ev.metrics[VALIDATION],
                            "validation_relative_flops": ev.validation_cost["relative_flops"], "fake_quant": cfg.quant_aware})
            ctx.log.info("%s epoch %d: loss %.4f (task %.4f, kd %.4f, emb %.4f), validation main %.4f%s", cfg.id, epoch + 1,
                         loss.item(), parts.get("task", float("nan")), parts.get("kd_logit", float("nan")),
                         parts.get("kd_embedding", float("nan")), score, " (fake-quant)" if cfg.quant_aware else "")
            if cfg.keep_best and (best is None or score > best):
                best, best_state = score, copy.deepcopy(accelerator.unwrap_model(model).state_dict())
                best_scales = _qat_scales(accelerator.unwrap_model(model)) if cfg.quant_aware else None

    final = accelerator.unwrap_model(model)
    if cfg.keep_best and best_state is not None:
        final.load_state_dict(best_state)
    extra = {"history": history, "train_steps": step, "pruning": pruning.to_dict(), "teacher": cfg.teacher,
             "teacher_dir": str(teacher_dir), "quant_aware": cfg.quant_aware}
    act_scales = None
    if cfg.quant_aware:
        if best_scales:
            for n, m in final.named_modules():
                if n in best_scales:
                    m.qat_amax = best_scales[n] * QMAX
        extra["fake_quant_validation"] = evaluate(final, ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION]).metrics[VALIDATION]
        act_scales = disable_qat(final)  # plain nn.Linear again (float weights)
    pruning, extra["refit"] = refit_to_target(final, ctx, pruning, cfg, cfg.eval_batch_size)
    extra["pruning"] = pruning.to_dict()
    ev = evaluate(final, ctx, pruning, cfg.eval_batch_size)
    if accelerator.is_main_process:
        save_stage_model(final, tokenizer, pruning, ctx.model_out)
        if act_scales is not None:
            save_act_scales(ctx.model_out, act_scales)
    result = ev.result(extra)
    if cfg.target_flops is not None:
        result.extra["flops_target"] = target_report(cfg, result)
    return result


def _qat_scales(model) -> dict[str, float]:
    return {n: m.qat_amax / QMAX for n, m in model.named_modules() if isinstance(m, QATLinear) and m.qat_amax}
