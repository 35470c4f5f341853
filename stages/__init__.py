"""Stages: one module per stage type, each a plain `run(cfg, ctx) -> StageResult` function.

`STAGE_TYPES` is the one registry of stage types: the recipe schema's union of stage configs,
the set of model-producing stages and the function each type runs are all derived from it.
Importing this package imports the (pydantic-only) configs, never torch: a stage's module is
imported only when the stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ltp_compress.stages.configs import (
    DistillStage, EvaluateStage, FinetuneStage, LTPHardStage, LTPSoftStage, ManualPruneStage, QuantizeStage, TopkPruneStage,
    TopPruneStage,
)


@dataclass(frozen=True)
class StageType:
    config: type  # the stage's pydantic config; its `stage` literal is the type name
    function: str  # "module:function" in ltp_compress.stages
    makes_model: bool  # writes model/ that later stages can start from


def _stage_name(config: type) -> str:
    (name,) = config.model_fields["stage"].annotation.__args__
    return name


STAGE_TYPES: dict[str, StageType] = {_stage_name(t.config): t for t in (
    StageType(FinetuneStage, "finetune:run", True),
    StageType(EvaluateStage, "evaluate:run", False),
    StageType(LTPSoftStage, "ltp_soft:run", True),
    StageType(LTPHardStage, "ltp_hard:run", True),
    StageType(ManualPruneStage, "prune_baselines:run_manual", True),
    StageType(TopkPruneStage, "prune_baselines:run_topk", True),
    StageType(TopPruneStage, "top_prune:run", True),
    StageType(DistillStage, "distill:run", True),
    StageType(QuantizeStage, "quantize:run", True),
)}

#: stage types that produce a model folder later stages can start from
MODEL_STAGES = frozenset(name for name, t in STAGE_TYPES.items() if t.makes_model)


def stage_function(stage: str):
    module, fn = STAGE_TYPES[stage].function.split(":")
    return getattr(importlib.import_module(f"ltp_compress.stages.{module}"), fn)
