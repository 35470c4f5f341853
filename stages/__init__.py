"""Stages: one module per stage type, each a plain `run(cfg, ctx) -> StageResult` function."""

import importlib

# stage type -> "module:function"; imported only when the stage runs
STAGE_FUNCTIONS = {
    "finetune": "finetune:run",
    "evaluate": "evaluate:run",
    "ltp_soft": "ltp_soft:run",
    "ltp_hard": "ltp_hard:run",
    "manual_prune": "prune_baselines:run_manual",
    "topk_prune": "prune_baselines:run_topk",
    "distill": "distill:run",
    "quantize": "quantize:run",
}


def is_implemented(stage: str) -> bool:
    module, _ = STAGE_FUNCTIONS[stage].split(":")
    return importlib.util.find_spec(f"ltp_compress.stages.{module}") is not None


def stage_function(stage: str):
    module, fn = STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(f"ltp_compress.stages.{module}"), fn)
