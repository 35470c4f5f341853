"""`evaluate`: validation and dev metrics and token-aware cost of a model, with the runtime it ships with
(packed token removal when it has a pruning rule). Produces no new model."""

from __future__ import annotations

from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.stages.configs import EvaluateStage
from ltp_compress.stages.context import StageContext, StageResult
from ltp_compress.stages.common import evaluate, set_seed


def run(cfg: EvaluateStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)
    model, _, pruning = load_stage_model(ctx.source_model, ctx.task)
    return evaluate(model, ctx, pruning, cfg.eval_batch_size).result({"pruning": pruning.to_dict()})
