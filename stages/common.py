"""Plain functions the stages share: seeding, accelerate setup, batching, optimisers, evaluation."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ltp_compress.modeling.pruned_encoder import ForwardOutput, PruningConfig, forward_for_pruning, forward_masked
from ltp_compress.modeling.accounting import EncoderShape, Precision, cost_summary
from ltp_compress.tasks.data import length_bucketed_batches
from ltp_compress.tasks.metrics import compute_metrics
from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages.length_slices import BY_LENGTH, length_slices
from ltp_compress.errors import UserError
from ltp_compress.stages import distributed as dist
from ltp_compress.stages.rank_distill import pruning_layers, rank_distill_loss


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(mixed_precision: str = "no"):
    """An accelerate Accelerator: the same loop runs on CPU, one GPU, or under `accelerate launch`
    (several processes: gloo on CPU, NCCL on GPUs; process group timeout from
    `distributed.ENV_TIMEOUT`)."""
    from accelerate import Accelerator

    dist.init_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=dist.use_cpu() if dist.launched_world_size() > 1 else False,
                       kwargs_handlers=dist.process_group_kwargs())


class PruningForward(torch.nn.Module):
    """The module a training stage hands to `accelerator.prepare` (DDP wraps it): the classifier
    and, for `ltp_soft`, the thresholds as a parameter, so that DDP all-reduces (averages) the
    threshold gradients exactly like the weights'. `forward` is `forward_masked` on the classifier."""

    def __init__(self, model: torch.nn.Module, thresholds: torch.nn.Parameter | None = None):
        super().__init__()
        self.model = model
        self.thresholds = thresholds

    def forward(self, input_ids, attention_mask, token_type_ids, **kwargs):
        if self.thresholds is not None:
            kwargs["thresholds"] = self.thresholds
        return forward_masked(self.model, input_ids, attention_mask, token_type_ids, **kwargs)


def grad_sync(accelerator, model):
    """Context for one training step's forward + backward: gradients are all-reduced (DDP), unless
    the test-only negative control `distributed.ENV_NO_GRAD_SYNC` is set."""
    return accelerator.no_sync(model) if dist.grad_sync_disabled() else contextlib.nullcontext()


def weighted(loss: torch.Tensor, weight: float) -> torch.Tensor:
    """`loss · weight` (no operation at weight 1: one process is bitwise unchanged)."""
    return loss if weight == 1.0 else loss * weight


def check_global_batch(cfg) -> None:
    dist.check_batch_size(cfg.batch_size, f"stage '{cfg.id}': batch_size")


def epoch_batches(ctx: StageContext, batch_size: int, epoch: int, start_step: int, steps_per_epoch: int, total_steps: int) -> list:
    """The global batches epoch `epoch` still has to run: from global step `start_step` (resume)
    up to `total_steps` (a fractional last epoch)."""
    first = epoch * steps_per_epoch
    batches = train_batches(ctx, batch_size, epoch)
    return batches[max(0, start_step - first):max(0, total_steps - first)]


def rank_batches(ctx: StageContext, cfg, epoch: int, start_step: int, steps_per_epoch: int, total_steps: int, device, recorder):
    """This process's share of the global batches epoch `epoch` still has to run, on `device`:
    yields (batch, share) where `share` carries the loss weights of this rank's part
    (stages/distributed.py `local_part`); the examples each rank trained on go to `recorder`."""
    batches = epoch_batches(ctx, cfg.batch_size, epoch, start_step, steps_per_epoch, total_steps)
    for batch in tqdm(batches, desc=f"{cfg.id} epoch {epoch + 1}", disable=not ctx.progress or not dist.is_main()):
        share = dist.local_part(batch)
        recorder.train(epoch, dist.real_indices(share))
        yield share.batch.to(device), share


def train_batches(ctx: StageContext, batch_size: int, epoch: int) -> list:
    return length_bucketed_batches(ctx.data.train, batch_size, shuffle=True, seed=ctx.seed + epoch, pad_token_id=ctx.data.pad_token_id)


def eval_batches(ctx: StageContext, split: str, batch_size: int) -> list:
    return length_bucketed_batches(ctx.data.eval_split(split), batch_size, shuffle=False, seed=0, pad_token_id=ctx.data.pad_token_id)


def steps_plan(num_batches: int, epochs: float) -> tuple[int, int]:
    """(total optimisation steps, full epochs to iterate) for a possibly fractional epoch count."""
    total = max(1, int(math.ceil(num_batches * epochs)))
    return total, int(math.ceil(epochs))


def adamw_with_warmup(param_groups: list[dict], lr: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW (no decay on biases / LayerNorm) + linear warmup then linear decay to 0."""
    opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=True)  # fused: CPU and CUDA
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(accelerator, model, loss, max_grad_norm: float, optimizers: list, scheduler, clip_params=None) -> None:
    """backward, clip the weights' gradient norm (`clip_params`, default all of `model`'s), step
    every optimizer and the schedule (once per global step, not per process; not when a mixed
    precision step was skipped), zero grads."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters() if clip_params is None else clip_params, max_grad_norm)
    for opt in optimizers:
        opt.step()
    if not any(getattr(opt, "step_was_skipped", False) for opt in optimizers):
        scheduler.step()
    for opt in optimizers:
        opt.zero_grad()


def weight_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def kd_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Classification: T² · KL(softmax(t/T) || softmax(s/T)), averaged over the batch
    (Hinton et al. 2015). Regression (one output): MSE(s, t) (temperature unused)."""
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [b]
    return kl.mean() * T * T


def load_kd_teacher(cfg, ctx, device):
    """The unpruned FP teacher named by a pruning stage's `kd_teacher` (eval, frozen), or None."""
    ref = getattr(cfg, "kd_teacher", None)
    if ref is None:
        return None
    teacher, _, _ = load_stage_model(ctx.model_source_of(ref), ctx.task)
    return teacher.eval().requires_grad_(False).to(device)


class StageLoss(NamedTuple):
    total: torch.Tensor  # what the optimizer steps on (before λ·mask in ltp_soft)
    rank: torch.Tensor | None  # the ranking-distillation term (unweighted), None when off


def check_rank_distill_layers(cfg, num_layers: int) -> None:
    """Before training: every `rank_distill_layers` index names a layer that prunes (0 .. L-2)."""
    layers = getattr(cfg, "rank_distill_layers", None)
    if rank_distill_on(cfg) and layers is not None and max(layers) > num_layers - 2:
        raise UserError(f"stage '{cfg.id}': rank_distill_layers {layers}: this model has {num_layers} layers; the layers that "
                        f"prune are 0 .. {num_layers - 2} (the last layer's score decides nothing)")


def rank_distill_on(cfg) -> bool:
    """Whether the stage distils the teacher's token ranking (ltp_soft / ltp_hard / top_prune option)."""
    return getattr(cfg, "rank_distill_weight", 0.0) > 0


def pruning_stage_loss(out: ForwardOutput, batch, teacher, cfg, num_labels: int) -> StageLoss:
    """Task loss, or with a teacher kd_alpha·task + (1-kd_alpha)·KD_logit (teacher runs dense); with
    `rank_distill_weight` > 0, + weight · ranking distillation of the teacher's final-layer token
    order into the student's pruning layers (stages/rank_distill.py; `out` must carry its scores)."""
    loss = task_loss(out.logits, batch.labels, num_labels)
    if teacher is None:
        return StageLoss(loss, None)
    ranking = rank_distill_on(cfg)
    with torch.no_grad():
        t_out = forward_masked(teacher, batch.input_ids, batch.attention_mask, batch.token_type_ids, mode="dense",
                               return_scores=ranking)
    loss = cfg.kd_alpha * loss + (1 - cfg.kd_alpha) * kd_logit_loss(out.logits, t_out.logits, cfg.kd_temperature)
    if not ranking:
        return StageLoss(loss, None)
    layers = pruning_layers(len(t_out.scores), cfg.rank_distill_layers)
    rank = rank_distill_loss(out.scores, t_out.scores[-1], batch.attention_mask, layers, cfg.rank_distill_topk)
    return StageLoss(loss + cfg.rank_distill_weight * rank, rank)


def predictions_from_logits(logits: torch.Tensor, num_labels: int) -> np.ndarray:
    if num_labels == 1:
        return logits.squeeze(-1).float().cpu().numpy()
    return logits.argmax(-1).cpu().numpy()


@dataclass
class EvalResult:
    metrics: dict  # task metrics + throughput + mean tokens
    kept_tokens: np.ndarray  # [N, L] tokens entering each layer, in split order
    lengths: np.ndarray  # [N]
    predictions: np.ndarray | None = None  # [N] class ids (int64) / regression outputs (float64), in split order


@torch.no_grad()
def evaluate_split(model, ctx: StageContext, split: str, pruning: PruningConfig, batch_size: int, *, desc: str = "eval", forward=None) -> EvalResult:
    """Inference on one evaluation split (validation or a dev set) with the real (packed) pruned
    runtime; metrics + token counts. `forward(model, batch, pruning)` defaults to the packed
    token-removing forward. With several processes each rank runs every N-th batch (disjoint parts
    covering the split once) and the (index, prediction, kept tokens, length) rows are gathered,
    so every rank computes the same metrics on the whole split; throughput uses the slowest rank."""
    forward = forward or (lambda m, b, p: forward_for_pruning(m, b, p, packed=True, return_kept=True))
    model.eval()
    ts = ctx.data.eval_split(split)
    batches = eval_batches(ctx, split, batch_size)[dist.rank()::dist.world_size()]
    device = next(model.parameters()).device
    n = len(ts.labels)
    L = model.config.num_hidden_layers
    preds = np.zeros(n, dtype=np.float64)
    kept = np.zeros((n, L), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    rows = []  # (index, prediction, lengths, kept tokens) per batch
    start = time.perf_counter()
    for batch in tqdm(batches, desc=desc, leave=False, disable=not ctx.progress or not dist.is_main()):
        batch = batch.to(device)
        out = forward(model, batch, pruning)
        rows.append((batch.index.cpu().numpy(), predictions_from_logits(out.logits, ts.num_labels).astype(np.float64),
                     batch.attention_mask.sum(1).cpu().numpy(), out.kept_tokens.cpu().numpy()))
    mine = [int(i) for r in rows for i in r[0]]
    if dist.world_size() > 1:
        rows = [r for part in dist.all_gather_objects(rows) for r in part]
    for idx, p, ln, k in rows:
        preds[idx] = p
        lengths[idx] = ln
        kept[idx] = k
    elapsed = dist.max_over_ranks(time.perf_counter() - start)
    metrics = compute_metrics(ctx.task, preds if ts.num_labels == 1 else preds.astype(np.int64), np.asarray(ts.labels))
    metrics["examples_per_s"] = n / elapsed
    metrics["mean_tokens"] = float(lengths.mean())
    metrics["num_examples"] = n
    dist.recorder().eval(split, mine, metrics)
    return EvalResult(metrics=metrics, kept_tokens=kept, lengths=lengths,
                      predictions=preds if ts.num_labels == 1 else preds.astype(np.int64))


@dataclass
class Evaluation:
    """Metrics and token-aware cost of one model on some evaluation splits."""

    metrics: dict[str, dict]  # split -> task metrics (+ throughput, mean tokens)
    costs: dict[str, dict]  # split -> cost summary (FLOPs / BOPs / kept tokens, both conventions)
    by_length: dict[str, dict] = field(default_factory=dict)  # split -> its length slices (stages/length_slices.py)
    per_example: dict[str, EvalResult] = field(default_factory=dict)  # split -> the evaluation pass's per-example arrays

    @property
    def selection_score(self) -> float:
        """The task's main metric on the validation split: the only score anything is chosen by."""
        return self.metrics[VALIDATION]["main"]

    @property
    def validation_cost(self) -> dict:
        return self.costs[VALIDATION]

    def result(self, extra: dict | None = None) -> StageResult:
        """A stage's result: metrics on every split, each with its length slices (`by_length`); `cost` of the
        first dev set (the reported number), the validation cost (what targets were fitted on) in extra."""
        dev = next(s for s in self.costs if s != VALIDATION)
        metrics = {split: {**m, BY_LENGTH: self.by_length[split]} if split in self.by_length else m for split, m in self.metrics.items()}
        return StageResult(metrics=metrics, cost=self.costs[dev], extra={"validation_cost": self.costs[VALIDATION], **(extra or {})})


def evaluate(model, ctx: StageContext, pruning: PruningConfig, batch_size: int, *, splits: list[str] | None = None,
             precision: Precision | None = None, forward=None) -> Evaluation:
    """Evaluate on `splits` (default: validation and every dev set; during training pass
    [VALIDATION] only: dev is evaluated once, for the model a stage returns)."""
    precision = precision or Precision.uniform(32, 32)
    shape = EncoderShape.from_config(model.config)
    ev = Evaluation({}, {})
    for split in splits or ctx.data.eval_names:
        res = evaluate_split(model, ctx, split, pruning, batch_size, desc=f"eval {split}", forward=forward)
        ev.metrics[split] = res.metrics
        ev.costs[split] = cost_summary(res.kept_tokens, res.lengths, shape, precision)
        ev.costs[split]["precision"] = precision.bits
        # the same pass, cut by the split's length quartiles (the stage result carries them: Evaluation.result)
        ev.by_length[split] = length_slices(ctx.task, res.predictions, np.asarray(ctx.data.eval_split(split).labels),
                                            res.kept_tokens, res.lengths, shape)
        ev.per_example[split] = res
    return ev
