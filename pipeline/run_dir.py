"""The run folder layout, in one place. Everything that reads or writes a run folder (the runner,
reports, plots, sweeps, the benchmark) goes through `RunDir`.

    <output_dir>/<name>/
        recipe.json            resolved recipe (after overrides)
        environment.json       package versions, threads, device
        data.json              splits: sizes, truncated inputs, validation carving, trivial baselines
        logs/run.log
        stages/NN-<id>/        one folder per *finished* stage: meta.json (+ model/)
        stages/.tmp-NN-<id>/   a stage in progress; never counted as finished; its checkpoint/
                               (training stages, stages/checkpoint.py) lets a rerun resume mid-stage
        report.json, report.md, plots/

A stage folder appears only by renaming its complete temporary folder, with meta.json (typed:
`StageMeta`, its one reader `read_stage_meta` and writer `write_stage_meta`) written last
(`publish_stage`), so an interrupted stage leaves no finished stage behind. An interrupted
stage's temporary folder is kept for the rerun only when it holds a checkpoint (everything else in
it is removed); the checkpoint is deleted just before the finished stage is renamed into place.
With several processes only rank 0 calls the writing methods (the runner)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ltp_compress.errors import UserError
from ltp_compress.fileio import atomic_write_json
from ltp_compress.json_model import read_json_model
from ltp_compress.stages.context import CHECKPOINT_DIR, MODEL_DIR, has_checkpoint

META_FILE = "meta.json"
_TMP_PREFIX = ".tmp-"
_STAGES_DIR = "stages"


class RunError(UserError, RuntimeError):
    """A run folder that cannot be used as asked (another recipe's run, no finished stages, ...)."""


def _read_json_file(path: Path) -> dict:
    """A run's JSON file (recipe.json, data.json, environment.json) as a mapping; RunError naming the file
    when it is not UTF-8, not JSON or not an object (a file edited or cut short by hand)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path}: unreadable ({type(e).__name__}: {e}); rewrite it or rerun the stage that wrote it") from None
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


class StageMeta(BaseModel):
    """A finished stage's meta.json (written by the runner, pipeline/runner.py). The fixed keys are
    typed; `config`, `metrics`, `cost` and `extra` are open (their content is the stage's). Every key
    but the last two has been written by every version of the runner; field order is the file's key order."""

    model_config = ConfigDict(extra="forbid")

    id: str
    stage: str  # the stage type (stages/__init__.py STAGE_TYPES)
    index: int  # position in the recipe (the NN of the folder name)
    config: dict[str, Any]  # the stage's resolved config (its recipe entry, by alias)
    source_model: str  # the model folder (or hub id) the stage started from
    source_stage: str | None  # the id of that stage; None: the recipe's model
    metrics: dict[str, Any]  # split -> metric dict
    cost: dict[str, Any] | None  # the accountant's summary (FLOPs / BOPs / kept tokens); None: no cost
    extra: dict[str, Any]  # stage-specific details
    wall_time_s: float
    finished_at: str  # local time, %Y-%m-%dT%H:%M:%S
    model_size_bytes: int | None = None  # only a stage that wrote a model
    parameter_count: int | None = None  # only a stage that wrote a model


def read_stage_meta(path: Path) -> StageMeta:
    """A stage's meta.json (`path`: the file or its stage folder); invalid JSON, a missing, unknown or
    mistyped key raises RunError naming the file and the key."""
    path = Path(path)
    return read_json_model(path / META_FILE if path.is_dir() else path, StageMeta, RunError)


def write_stage_meta(folder: Path, meta: StageMeta) -> None:
    """meta.json into `folder`: the keys that were set, in the model's order, their values as the stage
    gave them (json.dumps, indent 2, str() for anything else: the bytes the untyped writer wrote)."""
    atomic_write_json(Path(folder) / META_FILE, {k: getattr(meta, k) for k in StageMeta.model_fields if k in meta.model_fields_set})


@dataclass
class StageRecord:
    """A finished stage, as read back from its folder."""

    index: int
    id: str
    stage: str
    dir: Path
    meta: StageMeta  # config, metrics, cost, timings (meta.json)

    @property
    def metrics(self) -> dict:
        return self.meta.metrics

    @property
    def model_dir(self) -> Path | None:
        d = self.dir / MODEL_DIR
        return d if d.is_dir() else None


@dataclass(frozen=True)
class RunDir:
    path: Path

    # ------------------------------------------------------------------ files
    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.json"

    @property
    def environment_file(self) -> Path:
        return self.path / "environment.json"

    @property
    def data_file(self) -> Path:
        """Split sizes, truncation counts, how validation was carved, trivial baselines."""
        return self.path / "data.json"

    @property
    def log_file(self) -> Path:
        return self.path / "logs" / "run.log"

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def stages_dir(self) -> Path:
        return self.path / _STAGES_DIR

    # ------------------------------------------------------------------ stages
    def stage_dir(self, index: int, stage_id: str) -> Path:
        return self.stages_dir / f"{index:02d}-{stage_id}"

    def tmp_dir(self, index: int, stage_id: str) -> Path:
        return self.stages_dir / f"{_TMP_PREFIX}{index:02d}-{stage_id}"

    def finished(self) -> list[StageRecord]:
        """Every finished stage (a stage folder with meta.json), in recipe order."""
        out = []
        if not self.stages_dir.is_dir():
            return out
        for d in self.stages_dir.glob("[0-9][0-9]-*"):
            if (d / META_FILE).is_file():
                meta = read_stage_meta(d / META_FILE)
                out.append(StageRecord(meta.index, meta.id, meta.stage, d, meta))
        return sorted(out, key=lambda r: r.index)

    def start_stage(self, index: int, stage_id: str) -> tuple[Path, str | None]:
        """The stage's temporary folder and what happened to an earlier, interrupted attempt:
        None (there was none), "removed" (it had no checkpoint: the folder starts empty), or
        "resumed" (its checkpoint/ is kept, anything else in the folder is removed)."""
        tmp = self.tmp_dir(index, stage_id)
        if not tmp.exists():
            tmp.mkdir(parents=True)
            return tmp, None
        if has_checkpoint(tmp):
            for p in tmp.iterdir():
                if p.name != CHECKPOINT_DIR:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            return tmp, "resumed"
        shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp, "removed"

    def publish_stage(self, index: int, stage_id: str, meta: StageMeta) -> StageRecord:
        """Delete the stage's checkpoint, write meta.json last into the temporary folder, then
        rename it into place."""
        tmp, final = self.tmp_dir(index, stage_id), self.stage_dir(index, stage_id)
        shutil.rmtree(tmp / CHECKPOINT_DIR, ignore_errors=True)
        write_stage_meta(tmp, meta)
        tmp.rename(final)
        return StageRecord(index, stage_id, meta.stage, final, meta)

    # ------------------------------------------------------------------ reading
    def is_run(self) -> bool:
        return self.recipe_file.is_file()

    def recipe(self) -> dict:
        if not self.recipe_file.is_file():
            raise RunError(f"{self.path}: not a run directory (no {self.recipe_file.name})")
        return _read_json_file(self.recipe_file)

    def data_summary(self) -> dict:
        return _read_json_file(self.data_file) if self.data_file.is_file() else {}

    def environment(self) -> dict:
        return _read_json_file(self.environment_file) if self.environment_file.is_file() else {}

    @classmethod
    def containing_model(cls, model_dir: Path) -> "RunDir | None":
        """The run a stage's model folder (<run>/stages/NN-<id>/model) belongs to, if any."""
        model_dir = Path(model_dir)
        if model_dir.name == MODEL_DIR and model_dir.parent.parent.name == _STAGES_DIR:
            run = cls(model_dir.parent.parent.parent)
            return run if run.is_run() else None
        return None
