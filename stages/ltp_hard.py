"""`ltp_hard`: thresholds learned by `ltp_soft` are frozen, the mask is binary (score > θ_l), and
all weights are finetuned again under it."""

from __future__ import annotations

from ltp_compress.pipeline.models import load_stage_model
from ltp_compress.pipeline.recipe import LTPHardStage
from ltp_compress.pipeline.state import StageContext, StageResult
from ltp_compress.stages.finetune import train_with_fixed_pruning


def run(cfg: LTPHardStage, ctx: StageContext) -> StageResult:
    model, tokenizer, pruning = load_stage_model(ctx.source_model, ctx.task)
    if pruning.mode != "threshold":
        raise ValueError(f"{cfg.id}: source model {ctx.source_model} has no learned thresholds (pruning mode '{pruning.mode}')")
    return train_with_fixed_pruning(cfg, ctx, model, tokenizer, pruning)
