"""Baselines the paper compares against, on the same token-removing runtime:

* `manual_prune` — thresholds rising linearly with depth, θ_l = θ_L·(l+1)/L, nothing learned;
* `topk_prune` — SpAtten-style top-k: the first `dense_layers` layers keep every token, then the
  kept fraction of the original length decays linearly to `final_keep_ratio`.

Both optionally finetune the weights under the fixed rule (`epochs` > 0)."""

from __future__ import annotations

from ltp_compress.modeling.pruned_encoder import PruningConfig, linear_threshold_init, topk_keep_ratios
from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.configs import ManualPruneStage, TopkPruneStage
from ltp_compress.stages.context import StageContext, StageResult
from ltp_compress.stages.finetune import train_with_fixed_pruning


def run_manual(cfg: ManualPruneStage, ctx: StageContext) -> StageResult:
    model, tokenizer, _ = load_stage_model(ctx.source_model, ctx.task)
    L = model.config.num_hidden_layers
    pruning = PruningConfig(mode="threshold", thresholds=linear_threshold_init(L, cfg.final_threshold))
    return train_with_fixed_pruning(cfg, ctx, model, tokenizer, pruning)


def run_topk(cfg: TopkPruneStage, ctx: StageContext) -> StageResult:
    model, tokenizer, _ = load_stage_model(ctx.source_model, ctx.task)
    L = model.config.num_hidden_layers
    pruning = PruningConfig(mode="topk", keep_ratios=topk_keep_ratios(L, cfg.final_keep_ratio, cfg.dense_layers))
    return train_with_fixed_pruning(cfg, ctx, model, tokenizer, pruning)
