"""What the runner hands a stage (no global session): typed, explicit, read-only by convention."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ltp_compress.tasks.data import TokenizedSplit
from ltp_compress.tasks.glue import TaskSpec

#: the subfolder of a stage folder that holds its model (training stages: HF folder + pruning.json;
#: quantize: the deployable checkpoint)
MODEL_DIR = "model"

#: the subfolder of a stage's temporary folder that holds its mid-stage checkpoint (stages/checkpoint.py),
#: complete once its state file exists
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE_FILE = "state.json"


def has_checkpoint(stage_tmp_dir: Path) -> bool:
    """Whether an interrupted stage's temporary folder holds a complete checkpoint to resume from."""
    return (Path(stage_tmp_dir) / CHECKPOINT_DIR / CHECKPOINT_STATE_FILE).is_file()


#: the split every choice is made on (carved from train; see tasks/splits.py)
VALIDATION = "validation"


@dataclass
class TaskData:
    """Tokenised splits shared by every stage of a run. `validation` makes every choice (best
    checkpoint, λ steering, FLOPs calibration, INT8 fallback); `dev` is evaluated and reported only."""

    train: TokenizedSplit
    validation: TokenizedSplit  # carved from the training file
    dev: dict[str, TokenizedSplit]  # split name -> split ("dev", and "dev_mismatched" for MNLI)
    pad_token_id: int
    trivial_baseline: dict[str, dict] = field(default_factory=dict)  # split -> metrics of the majority-class / mean predictor

    @property
    def eval_names(self) -> list[str]:
        """Every split a model is evaluated on: validation first, then the dev set(s)."""
        return [VALIDATION, *self.dev]

    def eval_split(self, name: str):
        return self.validation if name == VALIDATION else self.dev[name]


@dataclass
class StageContext:
    """Everything a stage may use. The stage writes its files under `out_dir` only."""

    task: TaskSpec
    data: TaskData
    out_dir: Path  # where the stage writes; the runner moves it to `final_dir` once the stage has finished
    final_dir: Path  # the stage folder's place after it finished (for paths written into results)
    source_model: str  # folder (or hub id) of the model this stage starts from
    stage_models: dict[str, str]  # model folder of every finished model-producing stage by id, and "model": the recipe's model
    seed: int
    log: logging.Logger
    max_seq_length: int  # the recipe's truncation length (deployable checkpoints record it)
    progress: bool = True

    @property
    def model_out(self) -> Path:
        """Where the stage writes its model."""
        return self.out_dir / MODEL_DIR

    @property
    def final_model_dir(self) -> Path:
        """Where that model lives once the stage has finished."""
        return self.final_dir / MODEL_DIR

    def model_source_of(self, ref: str) -> str:
        """Model folder of an earlier stage id, or of the recipe's model for 'model'."""
        if ref not in self.stage_models:
            raise ValueError(f"stage '{ref}' has no model folder (finished model stages: {', '.join(self.stage_models)})")
        return self.stage_models[ref]


@dataclass
class StageResult:
    metrics: dict  # split -> metric dict
    cost: dict | None = None  # accountant summary (FLOPs / BOPs / kept tokens)
    extra: dict = field(default_factory=dict)
