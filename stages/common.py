"""Plain functions the stages share: seeding, accelerate setup, batching, optimisers, evaluation."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_for_pruning, forward_masked
from ltp_compress.modeling.accounting import EncoderShape, Precision, cost_summary
from ltp_compress.tasks.data import length_bucketed_batches
from ltp_compress.tasks.metrics import compute_metrics
from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_accelerator(mixed_precision: str = "no"):
    """An accelerate Accelerator: the same loop runs on CPU, one GPU, or under `accelerate launch`."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision)


def shard(batches: list, accelerator) -> list:
    """This process's share of a batch list (equal counts across processes for DDP)."""
    n = accelerator.num_processes
    if n == 1:
        return batches
    usable = len(batches) - len(batches) % n
    return batches[accelerator.process_index:usable:n]


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


def optimizer_step(accelerator, model, loss, max_grad_norm: float, optimizers: list, scheduler) -> None:
    """backward, clip the weights' gradient norm, step every optimizer and the schedule, zero grads."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    for opt in optimizers:
        opt.step()
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


def pruning_stage_loss(logits: torch.Tensor, batch, teacher, cfg, num_labels: int) -> torch.Tensor:
    """Task loss, or with a teacher kd_alpha·task + (1-kd_alpha)·KD_logit (teacher runs dense)."""
    loss = task_loss(logits, batch.labels, num_labels)
    if teacher is None:
        return loss
    with torch.no_grad():
        t_logits = forward_masked(teacher, batch.input_ids, batch.attention_mask, batch.token_type_ids, mode="dense").logits
    return cfg.kd_alpha * loss + (1 - cfg.kd_alpha) * kd_logit_loss(logits, t_logits, cfg.kd_temperature)


def predictions_from_logits(logits: torch.Tensor, num_labels: int) -> np.ndarray:
    if num_labels == 1:
        return logits.squeeze(-1).float().cpu().numpy()
    return logits.argmax(-1).cpu().numpy()


@dataclass
class EvalResult:
    metrics: dict  # task metrics + throughput + mean tokens
    kept_tokens: np.ndarray  # [N, L] tokens entering each layer, in split order
    lengths: np.ndarray  # [N]


@torch.no_grad()
def evaluate_split(model, ctx: StageContext, split: str, pruning: PruningConfig, batch_size: int, *, desc: str = "eval", forward=None) -> EvalResult:
    """Inference on one evaluation split (validation or a dev set) with the real (packed) pruned
    runtime; metrics + token counts. `forward(model, batch, pruning)` defaults to the packed
    token-removing forward."""
    forward = forward or (lambda m, b, p: forward_for_pruning(m, b, p, packed=True, return_kept=True))
    model.eval()
    ts = ctx.data.eval_split(split)
    batches = eval_batches(ctx, split, batch_size)
    device = next(model.parameters()).device
    n = len(ts.labels)
    L = model.config.num_hidden_layers
    preds = np.zeros(n, dtype=np.float64)
    kept = np.zeros((n, L), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    start = time.perf_counter()
    for batch in tqdm(batches, desc=desc, leave=False, disable=not ctx.progress):
        batch = batch.to(device)
        out = forward(model, batch, pruning)
        idx = batch.index.cpu().numpy()
        preds[idx] = predictions_from_logits(out.logits, ts.num_labels)
        lengths[idx] = batch.attention_mask.sum(1).cpu().numpy()
        kept[idx] = out.kept_tokens.cpu().numpy()
    elapsed = time.perf_counter() - start
    metrics = compute_metrics(ctx.task, preds if ts.num_labels == 1 else preds.astype(np.int64), np.asarray(ts.labels))
    metrics["examples_per_s"] = n / elapsed
    metrics["mean_tokens"] = float(lengths.mean())
    metrics["num_examples"] = n
    return EvalResult(metrics=metrics, kept_tokens=kept, lengths=lengths)


@dataclass
class Evaluation:
    """Metrics and token-aware cost of one model on some evaluation splits."""

    metrics: dict[str, dict]  # split -> task metrics (+ throughput, mean tokens)
    costs: dict[str, dict]  # split -> cost summary (FLOPs / BOPs / kept tokens, both conventions)

    @property
    def selection_score(self) -> float:
        """The task's main metric on the validation split: the only score anything is chosen by."""
        return self.metrics[VALIDATION]["main"]

    @property
    def validation_cost(self) -> dict:
        return self.costs[VALIDATION]

    def result(self, extra: dict | None = None) -> StageResult:
        """A stage's result: metrics on every split; `cost` of the first dev set (the reported
        number), the validation cost (what targets were fitted on) in extra."""
        dev = next(s for s in self.costs if s != VALIDATION)
        return StageResult(metrics=self.metrics, cost=self.costs[dev], extra={"validation_cost": self.costs[VALIDATION], **(extra or {})})


def evaluate(model, ctx: StageContext, pruning: PruningConfig, batch_size: int, *, splits: list[str] | None = None,
             precision: Precision | None = None, forward=None) -> Evaluation:
    """Evaluate on `splits` (default: validation and every dev set; during training pass
    [VALIDATION] only: dev is evaluated once, for the model a stage returns)."""
    precision = precision or Precision.uniform(32, 32)
    metrics, costs = {}, {}
    for split in splits or ctx.data.eval_names:
        res = evaluate_split(model, ctx, split, pruning, batch_size, desc=f"eval {split}", forward=forward)
        metrics[split] = res.metrics
        costs[split] = cost_summary(res.kept_tokens, res.lengths, EncoderShape.from_config(model.config), precision)
        costs[split]["precision"] = precision.bits
    return Evaluation(metrics, costs)
