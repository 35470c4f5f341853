"""`distill`: knowledge distillation from the unpruned FP teacher into the pruned student.

The student (the model in ctx.source_model, normally the ltp_hard output) trains under its frozen
pruning rule (binary masks, `forward_masked` mode "hard" / "topk" from its PruningConfig); the
teacher (model of stage `cfg.kd_teacher`) runs dense, in eval mode, without gradients.

    loss = kd_alpha·task + (1-kd_alpha)·(logit_weight·KD_logit + embedding_weight·KD_emb)
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

from ltp_compress.modeling.pruned_encoder import forward_masked
from ltp_compress.modeling.quantized import QATLinear, QMAX, disable_qat, enable_qat, save_act_scales
from ltp_compress.modeling.model_io import load_stage_model, save_stage_model
from ltp_compress.stages.configs import DistillStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages.flops_target import refit_to_target, target_report
from ltp_compress.stages import distributed as dist
from ltp_compress.stages.checkpoint import load_checkpoint, save_checkpoint
from ltp_compress.stages.common import (
    PruningForward, adamw_with_warmup, check_global_batch, rank_batches, evaluate, grad_sync, kd_logit_loss, make_accelerator,
    optimizer_step, set_seed, steps_plan, task_loss, train_batches, weight_param_groups, weighted,
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


def distill_loss(student_out, teacher_out, labels, attention_mask, num_labels: int, cfg, *, example_weight: float = 1.0,
                 token_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The stage's total loss and its parts (floats, for logging). With several processes the
    per-example terms are weighted by `example_weight` and the per-token embedding term by
    `token_weight` (distributed.LocalBatch), so DDP's average is the global batch's loss gradient."""
    lt = task_loss(student_out.logits, labels, num_labels)
    lk = kd_logit_loss(student_out.logits, teacher_out.logits, cfg.kd_temperature)
    le = embedding_loss(student_out.embeddings, teacher_out.embeddings, attention_mask)
    kd = cfg.logit_weight * weighted(lk, example_weight) + cfg.embedding_weight * weighted(le, token_weight)
    loss = cfg.kd_alpha * weighted(lt, example_weight) + (1 - cfg.kd_alpha) * kd
    return loss, {"task": lt.item(), "kd_logit": lk.item(), "kd_embedding": le.item()}


def run(cfg: DistillStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    check_global_batch(cfg)
    model, tokenizer, pruning = load_stage_model(ctx.source_model, ctx.task)
    teacher_dir = ctx.model_source_of(cfg.kd_teacher)
    teacher, _, _ = load_stage_model(teacher_dir, ctx.task)
    teacher.eval().requires_grad_(False)
    mode = pruning.masked_mode
    thresholds = pruning.thresholds_tensor
    qat_modules = {}
    if cfg.quant_aware:
        enable_qat(model)
        qat_modules = {n: m for n, m in model.named_modules() if isinstance(m, QATLinear)}

    steps_per_epoch = len(train_batches(ctx, cfg.batch_size, 0))
    total_steps, n_epochs = steps_plan(steps_per_epoch, cfg.epochs)
    opt, sched = adamw_with_warmup(weight_param_groups(model, cfg.weight_decay), cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    net, opt = accelerator.prepare(PruningForward(model), opt)
    teacher.to(accelerator.device)
    if thresholds is not None:
        thresholds = thresholds.to(accelerator.device)

    history, best, best_state, best_scales, step, start_epoch, parts = [], None, None, None, 0, 0, {}
    last_loss = float("nan")
    ckpt = load_checkpoint(ctx.out_dir, cfg, ctx.log)
    if ckpt is not None:
        ckpt.restore(model, {"weights": opt}, sched)
        st = ckpt.state
        history, best, best_scales, parts, last_loss = st["history"], st["best"], st["best_scales"], st["parts"], st["loss"]
        for n, v in st["qat_amax"].items():
            qat_modules[n].qat_amax = v
        best_state = {k[len("best/"):]: v.to(accelerator.device) for k, v in ckpt.tensors.items() if k.startswith("best/")} or None
        step, start_epoch = ckpt.step, ckpt.epoch
        ctx.log.info("%s: resuming from the checkpoint at step %d of %d (epoch %d)", cfg.id, step, total_steps, start_epoch + 1)

    rec = dist.recorder()
    for epoch in range(start_epoch, n_epochs):
        net.train()
        for batch, local in rank_batches(ctx, cfg, epoch, step, steps_per_epoch, total_steps, accelerator.device, rec):
            with torch.no_grad():
                t_out = forward_masked(teacher, batch.input_ids, batch.attention_mask, batch.token_type_ids, mode="dense")
            with grad_sync(accelerator, net):
                with accelerator.autocast():
                    s_out = net(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                mode=mode, thresholds=thresholds, keep_ratios=pruning.keep_ratios)
                    loss, parts = distill_loss(s_out, t_out, batch.labels, batch.attention_mask, ctx.task.num_labels, cfg,
                                               example_weight=local.example_weight, token_weight=local.token_weight)
                optimizer_step(accelerator, net, loss, cfg.max_grad_norm, [opt], sched)
            # QAT activation ranges: EMA of the global batch max = max over ranks of the local EMAs
            dist.sync_float_attrs_max(qat_modules, "qat_amax")
            step += 1
            last_loss = loss.item()
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < total_steps:
                save_checkpoint(ctx.out_dir, cfg, step=step, epoch=epoch, model=model, optimizers={"weights": opt}, scheduler=sched,
                                tensors={f"best/{k}": v for k, v in (best_state or {}).items()},
                                state={"history": history, "best": best, "best_scales": best_scales, "parts": parts, "loss": last_loss,
                                       "qat_amax": {n: m.qat_amax for n, m in qat_modules.items()}})
            dist.maybe_fail(cfg.id, step)
        if cfg.eval_every_epoch or epoch == n_epochs - 1:
            # quant-aware: this evaluates the fake-quantised student (what INT8 will deploy)
            ev = evaluate(model, ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION])
            score = ev.selection_score
            history.append({"epoch": epoch + 1, "step": step, "loss": last_loss, **parts, "validation": ev.metrics[VALIDATION],
                            "validation_relative_flops": ev.validation_cost["relative_flops"], "fake_quant": cfg.quant_aware})
            ctx.log.info("%s epoch %d: loss %.4f (task %.4f, kd %.4f, emb %.4f), validation main %.4f%s", cfg.id, epoch + 1,
                         last_loss, parts.get("task", float("nan")), parts.get("kd_logit", float("nan")),
                         parts.get("kd_embedding", float("nan")), score, " (fake-quant)" if cfg.quant_aware else "")
            if cfg.keep_best and (best is None or score > best):
                best, best_state = score, copy.deepcopy(model.state_dict())
                best_scales = _qat_scales(model) if cfg.quant_aware else None

    final = model
    if cfg.keep_best and best_state is not None:
        final.load_state_dict(best_state)
    extra = {"history": history, "train_steps": step, "pruning": pruning.to_dict(), "teacher": cfg.kd_teacher,
             "teacher_dir": str(teacher_dir), "quant_aware": cfg.quant_aware}
    act_scales = None
    if cfg.quant_aware:
        if best_scales:
            for n, m in final.named_modules():
                if n in best_scales:
                    m.qat_amax = best_scales[n] * QMAX
        extra["fake_quant_validation"] = evaluate(final, ctx, pruning, cfg.eval_batch_size, splits=[VALIDATION]).metrics[VALIDATION]
        act_scales = disable_qat(final)  # plain nn.Linear again (float weights)
    pruning, extra["refit"] = dist.decide_on_main(refit_to_target, final, ctx, pruning, cfg, cfg.eval_batch_size)  # rank 0, broadcast
    extra["pruning"] = pruning.to_dict()
    ev = evaluate(final, ctx, pruning, cfg.eval_batch_size)
    if dist.is_main():
        save_stage_model(final, tokenizer, pruning, ctx.model_out)
        if act_scales is not None:
            save_act_scales(ctx.model_out, act_scales)
    result = ev.result(extra)
    if cfg.target_flops is not None:
        result.extra["flops_target"] = target_report(cfg, result)
    return result


def _qat_scales(model) -> dict[str, float]:
    return {n: m.qat_amax / QMAX for n, m in model.named_modules() if isinstance(m, QATLinear) and m.qat_amax}
