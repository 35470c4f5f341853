"""Typed run state, passed explicitly from the runner to each stage (no global session)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ltp_compress.pipeline.recipe import Recipe
from ltp_compress.pipeline.tasks import TaskSpec


@dataclass
class TaskData:
    """Tokenised splits shared by every stage of a run."""

    train: object  # TokenizedSplit
    dev: dict[str, object]  # split name -> TokenizedSplit ("dev", and "dev_mismatched" for MNLI)
    pad_token_id: int


@dataclass
class StageRecord:
    """A finished stage, as read back from its folder."""

    index: int
    id: str
    stage: str
    dir: Path
    meta: dict  # config, metrics, cost, timings (meta.json)

    @property
    def metrics(self) -> dict:
        return self.meta.get("metrics", {})

    @property
    def model_dir(self) -> Path | None:
        d = self.dir / "model"
        return d if d.is_dir() else None


@dataclass
class StageContext:
    """Everything a stage may use. The stage writes its files under `out_dir` only."""

    recipe: Recipe
    task: TaskSpec
    data: TaskData
    run_dir: Path
    out_dir: Path  # temporary stage folder; renamed into place by the runner when complete
    source_model: str  # folder (or hub id) of the model this stage starts from
    source_record: StageRecord | None  # the stage that produced it (None: the recipe's model)
    records: dict[str, StageRecord]  # finished stages by id
    seed: int
    log: logging.Logger
    progress: bool = True
    base_model: str = ""  # folder (or hub id) of the recipe's `model`

    def model_source_of(self, ref: str) -> str:
        """Model folder of an earlier stage id, or of the recipe's model for 'model'."""
        if ref == "model":
            return self.base_model
        model_dir = self.records[ref].model_dir
        if model_dir is None:
            raise ValueError(f"stage '{ref}' has no model folder")
        return str(model_dir)


@dataclass
class StageResult:
    metrics: dict  # split -> metric dict
    cost: dict | None = None  # accountant summary (FLOPs / BOPs / kept tokens)
    extra: dict = field(default_factory=dict)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp files are owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
