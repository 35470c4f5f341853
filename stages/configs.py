"""Stage configurations: one strict pydantic model per stage type (extra="forbid"), imported by
the recipe schema. Light: pydantic only (no torch), so `ltp-compress validate` stays fast.

The stage registry (type name -> config, function, whether it writes a model) is
`ltp_compress.stages.STAGE_TYPES`; the `stage` literal of each config below is the type name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ltp_compress.kernels.backends import ACTIVATION_RANGES, BACKENDS, LEGACY_ACTIVATION_RANGE

#: `init_from` / `kd_teacher` value meaning the recipe's `model` rather than a stage
RECIPE_MODEL = "model"

#: stage keys retired by a rename, per stage type: old spelling -> the key that replaced it. Every
#: stage spells knowledge distillation `kd_teacher` / `kd_alpha` / `kd_temperature` (the prefix says
#: what the key belongs to: ltp_soft also has a sigmoid `temperature` and a `lambda` weight). A recipe
#: using an old spelling is refused, naming the new key; the config a finished stage stored before
#: the rename (meta.json) is read in the new spelling by `current_spelling`.
RENAMED_KEYS: dict[str, dict[str, str]] = {"distill": {"teacher": "kd_teacher", "alpha": "kd_alpha"}}


def current_spelling(stage_type: str, config: dict) -> dict:
    """A stored stage config (JSON dict) with every retired key of its stage type renamed."""
    renamed = RENAMED_KEYS.get(stage_type, {})
    return {renamed.get(k, k): v for k, v in config.items()}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StageBase(StrictModel):
    id: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", description="name later stages use to refer to this one")
    init_from: str | None = Field(None, description="stage id whose output model this stage starts from, or 'model' for the recipe's model (default: the previous model-producing stage, or the recipe's model)")

    @model_validator(mode="before")
    @classmethod
    def _refuse_retired_keys(cls, data):
        if isinstance(data, dict):
            renamed = RENAMED_KEYS.get(data.get("stage"), {})
            old = [k for k in data if k in renamed]
            if old:
                raise ValueError(f"stage '{data.get('id')}' ({data.get('stage')}): "
                                 + "; ".join(f"'{k}' is now spelled '{renamed[k]}'" for k in old)
                                 + " (every stage spells its distillation keys kd_teacher / kd_alpha / kd_temperature)")
        return data


class TrainStageBase(StageBase):
    epochs: float = Field(3.0, gt=0, description="passes over the training set (fractions allowed)")
    lr: float = Field(2.0e-5, gt=0)
    batch_size: int = Field(32, ge=1, description="global batch size: the same on 1 or N processes (`accelerate launch`); each "
                                                  "process takes batch_size / N examples of every batch, so it must be divisible by N")
    eval_batch_size: int = Field(64, ge=1)
    checkpoint_every_steps: int = Field(1000, ge=0, description="write a resumable checkpoint (weights, optimizer, schedule, RNG, "
                                                                "loop state) into the stage's temporary folder every this many "
                                                                "global steps; rerunning an interrupted stage resumes from it; 0 = off")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every_epoch: bool = True
    keep_best: bool = Field(True, description="keep the checkpoint with the best validation main metric (never dev)")


class FinetuneStage(TrainStageBase):
    """Finetune the model (the teacher) on the task."""

    stage: Literal["finetune"]


class EvaluateStage(StageBase):
    """Evaluate a model on the validation split and the dev set(s); produces metrics, no new model."""

    stage: Literal["evaluate"]
    eval_batch_size: int = Field(64, ge=1)


class PruneTrainStageBase(TrainStageBase):
    """Training under token pruning, optionally with logit distillation from an unpruned teacher."""

    kd_teacher: str | None = Field(None, description="stage id (or 'model') of an unpruned FP teacher: adds logit KD to the loss, "
                                                     "loss = kd_alpha·task + (1-kd_alpha)·T²·KL(teacher || student)")
    kd_alpha: float = Field(0.5, ge=0, le=1, description="weight of the task loss when kd_teacher is set")
    kd_temperature: float = Field(2.0, gt=0, description="softmax temperature of the logit KD term")


FlopsConvention = Literal["executed", "paper"]
CalibrationInputs = Literal["validation", "train", "dev"]


class FlopsTargetFields(StrictModel):
    """Fields of a stage that lands a relative-FLOPs target (inputs only, never labels)."""

    target_tolerance: float = Field(0.05, gt=0, le=0.5, description="a FLOPs value within target·(1 ± tolerance) meets the target")
    flops_convention: FlopsConvention = Field(
        "executed", description="what `target_flops` counts: 'executed' (what our runtime runs: pruned tokens skip their layer's "
                                "output projection) or 'paper' (the official LTP code's count, to compare with the paper)")
    flops_calibration_inputs: CalibrationInputs = Field(
        "validation", description="inputs (never labels) the FLOPs target is measured on: 'validation' (default), 'train', or "
                                  "'dev' = unlabelled deployment inputs (an explicit choice; results say so)")


class RankDistillFields(StrictModel):
    """ToP's ranking distillation (stages/rank_distill.py): the unpruned `kd_teacher`'s final-layer token
    order taught to each pruning layer's importance scores (a top-k ListMLE loss)."""

    rank_distill_weight: float = Field(0.0, ge=0, description="weight of the ranking-distillation loss added to the stage loss "
                                                              "(0 = off; needs kd_teacher: the ranking is the unpruned teacher's)")
    rank_distill_topk: int = Field(20, ge=2, description="length of the teacher's ranked list per example (ToP: the top 20)")
    rank_distill_layers: list[int] | None = Field(None, description="encoder layers (0-based) whose scores are distilled; "
                                                                    "default: every layer that prunes (0 .. L-2)")

    @model_validator(mode="after")
    def _rank_distill_needs_teacher(self):
        if self.rank_distill_weight > 0 and getattr(self, "kd_teacher", None) is None:
            raise ValueError("rank_distill_weight > 0 needs kd_teacher: the ranking distilled is the unpruned teacher's")
        if self.rank_distill_layers is not None and (not self.rank_distill_layers or min(self.rank_distill_layers) < 0):
            raise ValueError(f"rank_distill_layers must be a non-empty list of layer indices >= 0, got {self.rank_distill_layers}")
        return self


class LTPSoftStage(PruneTrainStageBase, FlopsTargetFields, RankDistillFields):
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
    target_flops: float | None = Field(None, gt=0, le=1, description="relative FLOPs to reach during training (see flops_controller) "
                                                                     "and land at the end on the calibration inputs")
    flops_controller: Literal["annealed_target", "lambda_with_ceiling", "lambda_with_bounds", "lambda"] = Field(
        "lambda_with_bounds", json_schema_extra={"absent_means": "lambda"},  # stages finished before the option steered λ
        description="how training reaches target_flops (default chosen on validation: "
                    "benchmarks/results/controller_study/protocol.md, its addendum): 'annealed_target' — a FLOPs schedule falls linearly from the start's "
                    "FLOPs to the target over the first anneal_until of the steps and is held after; at every probe one "
                    "offset along the threshold ramp puts the hard-threshold FLOPs on the schedule (the gradient of the "
                    "task and λ terms decides which layers and tokens prune, the schedule how much), so the target is "
                    "reached during training on any task; 'lambda_with_ceiling' — λ is steered towards the target "
                    "(bounded, as 'lambda') and the threshold offset acts only when the FLOPs are above the schedule, so the "
                    "gradient does the pruning where λ can and the offset guarantees the target where it cannot; "
                    "'lambda_with_bounds' — as 'lambda_with_ceiling', and FLOPs that fall below the target by more than "
                    "the tolerance are moved back up to it (a floor: λ cannot un-prune quickly); "
                    "'lambda' — the first versions' bounded λ steering, which can "
                    "stall below the target (λ capped at 10·λ0) and leave the end-of-stage offset a large move")
    anneal_until: float = Field(0.5, gt=0, le=1, description="annealed_target: fraction of the steps by which the schedule reaches the target")
    max_correction_points: float = Field(1.0, ge=0, description="an end-of-stage offset that costs more than this many validation "
                                                               "points (main metric x 100) is reported as a warning on the console "
                                                               "and in the report")


class RetargetFields(StrictModel):
    """How a threshold rule keeps a FLOPs target while its weights are finetuned (ltp_hard, manual_prune)."""

    retargets: int = Field(8, ge=1, description="how many re-fits (evenly spaced over the first retarget_until of the steps)")
    retarget_until: float = Field(0.75, gt=0, le=1, description="fraction of the steps after which the thresholds are frozen")


class LTPHardStage(PruneTrainStageBase, FlopsTargetFields, RetargetFields, RankDistillFields):
    """Hard pruning: thresholds frozen, binary mask, weights finetuned again."""

    stage: Literal["ltp_hard"]
    epochs: float = Field(1.0, gt=0)
    target_flops: float | None = Field(None, gt=0, le=1, description="re-fit the thresholds (one offset along the linear ramp) during the "
                                                                     "first retarget_until of training so relative FLOPs stays at this value; "
                                                                     "None: thresholds stay exactly as ltp_soft left them (the paper)")


class ManualPruneStage(PruneTrainStageBase, FlopsTargetFields, RetargetFields):
    """Baseline: fixed thresholds rising linearly with depth (nothing learned); optional finetune."""

    stage: Literal["manual_prune"]
    final_threshold: float = Field(0.5, gt=0, description="θ_L of the fixed linear thresholds (normalised-score units)")
    epochs: float = Field(0.0, ge=0)
    target_flops: float | None = Field(None, gt=0, le=1, description="choose θ_L (the ramp stays linear) so relative FLOPs on the "
                                                                     "calibration inputs lands at this value before finetuning, and re-fit "
                                                                     "it like ltp_hard while finetuning: the same budget as LTP at a FLOPs "
                                                                     "level. None: final_threshold as given")


class TopkPruneStage(PruneTrainStageBase, FlopsTargetFields):
    """Baseline (SpAtten-style top-k): first layers keep all, then keep ratio decays linearly."""

    stage: Literal["topk_prune"]
    final_keep_ratio: float = Field(0.3, gt=0, le=1)
    dense_layers: int = Field(3, ge=0)
    epochs: float = Field(0.0, ge=0)
    target_flops: float | None = Field(None, gt=0, le=1, description="choose final_keep_ratio so relative FLOPs on the calibration inputs "
                                                                     "lands at this value (top-k counts depend on lengths only, so it stays "
                                                                     "there while finetuning). None: final_keep_ratio as given")


class TopPruneStage(PruneTrainStageBase, FlopsTargetFields, RankDistillFields):
    """Baseline (ToP, Li et al. KDD'23): hard-concrete L0 gates trained to a FLOPs target under a
    Lagrangian constraint, coarse-to-fine (a gate per layer: does it prune; gates over relative-rank
    bins: which ranked tokens it keeps), optionally with ranking distillation; deployed as a top-k
    rule (stages/top_prune.py). Defaults: sized for MiniLM-L6 on GLUE (a few thousand steps); a
    tiny model needs a larger reg_lr for the gates to move in a few steps."""

    stage: Literal["top_prune"]
    epochs: float = Field(2.0, gt=0, description="passes over the training set of the gate phase (weights, gates and "
                                                 "Lagrange multipliers train jointly)")
    target_flops: float = Field(gt=0, le=1, description="relative FLOPs (flops_convention) the Lagrangian constraint trains the "
                                                        "gates' expected FLOPs to, and the deployed top-k rule lands on the "
                                                        "calibration inputs within ±0.01")
    rank_bins: int = Field(20, ge=2, description="token gates per pruning layer, one per bin of relative rank: a present token "
                                                 "ranked r-th (0 = best) of n is in bin floor(r·rank_bins/n) (ToP's bin_num)")
    droprate_init: float = Field(0.01, gt=0, lt=1, description="initial token-bin gates: log α = log((1-p)/p) (Louizos et al.), "
                                                               "clamped to ±log 100 like every log α; 0.01 = ToP's start, every bin open")
    layer_droprate_init: float = Field(0.99, gt=0, lt=1, description="initial layer gates, the same formula; 0.99 = ToP's start, "
                                                                     "every layer gate closed (no layer prunes until the constraint opens it)")
    gate_temperature: float = Field(2.0 / 3.0, gt=0, description="hard-concrete temperature β (Louizos et al. 2018; ToP: 2/3)")
    reg_lr: float = Field(0.02, gt=0, description="Adam learning rate of the gates' log α (descent) and of the Lagrange multipliers "
                                                  "λ1, λ2 (ascent); each moves about reg_lr per step")
    lagrangian_warmup: float = Field(0.5, ge=0, le=1, description="fraction of the gate phase's steps over which the constraint's "
                                                                 "target falls linearly from 1.0 to target_flops (0: the target from "
                                                                 "the first step)")
    finetune_epochs: float = Field(1.0, ge=0, description="after the gates are fixed and the top-k rule is landed on the target, "
                                                          "finetune the weights under that rule for this many epochs (the stage's "
                                                          "lr, batch size and KD settings; keep_best); 0 = none")


class DistillStage(TrainStageBase, FlopsTargetFields):
    """Knowledge distillation from an unpruned FP teacher into the (pruned) student.

    loss = kd_alpha·task + (1-kd_alpha)·(logit_weight·KD_logit + embedding_weight·MSE(embedding outputs));
    the student trains under its frozen pruning rule, the teacher runs dense."""

    stage: Literal["distill"]
    kd_teacher: str = Field(description="stage id of the FP teacher, or 'model' for the recipe's model")
    kd_alpha: float = Field(0.5, ge=0, le=1, description="loss = kd_alpha·task + (1-kd_alpha)·KD")
    kd_temperature: float = Field(2.0, gt=0, description="softmax temperature T of the logit KD term (KL · T²); unused for regression")
    logit_weight: float = Field(1.0, ge=0, description="weight of the logit KD term inside the KD part")
    embedding_weight: float = Field(1.0, ge=0, description="weight of the MSE between student and teacher embedding-layer outputs (real tokens)")
    quant_aware: bool = Field(False, description="INT8 fake quantisation (STE) during distillation; activation scales saved to act_scales.json")
    epochs: float = Field(1.0, gt=0, description="passes over the training set (fractions allowed)")
    target_flops: float | None = Field(None, gt=0, le=1, description="after training, re-fit the thresholds (one offset along the ramp) "
                                                                     "so the distilled model runs at this relative FLOPs (training moves it)")


class QuantizeStage(StageBase, FlopsTargetFields):
    """Static symmetric INT8 of every Linear (per-channel weights, per-tensor activations)."""

    stage: Literal["quantize"]
    calibration_batches: int = Field(32, ge=1, description="training batches run through the pruned runtime to observe activation ranges")
    calibration_batch_size: int = Field(32, ge=1, description="examples per calibration batch")
    observer: Literal["minmax", "percentile"] = Field("minmax", description="activation range: max |x| (minmax) or a percentile of |x|")
    percentile: float = Field(99.99, gt=50, le=100, description="percentile of |x| used by the 'percentile' observer")
    backend: Literal[BACKENDS] = Field("auto", description="INT8 GEMM backend for evaluation ('auto': best available, resolved once)")
    eval_batch_size: int = Field(64, ge=1, description="evaluation batch size")
    fuse_gelu: bool = Field(True, description="fuse the exact GELU into the FFN's first INT8 kernel (when the model uses erf GELU)")
    attention_matmuls: Literal["fp32", "int8"] = Field("fp32", description="the two attention matmuls (Q·Kᵀ, P·V): float32, or int8 "
                                                                           "grids with exact integer accumulation (static Q/K/V scales "
                                                                           "calibrated like the Linear inputs, probabilities uint8 at "
                                                                           "1/255); BOPs charge them 32x32 or 8x8 bits")
    activation_range: Literal[tuple(ACTIVATION_RANGES)] = Field(
        "full", description="quantised Linear inputs in [-128, 127] ('full': the saturating range of ONNX QuantizeLinear, so the "
                            "export needs no clamp before each quantisation) or [-127, 127] ('symmetric', the convention of "
                            "checkpoints made before this option); the scale is symmetric either way (a / 127)",
        json_schema_extra={"absent_means": LEGACY_ACTIVATION_RANGE})  # a stage finished before the option: [-127, 127]
    reuse_qat_scales: bool = Field(False, description="use the activation scales observed by a quant-aware distill stage (act_scales.json beside the source model) instead of calibrating")
    max_accuracy_drop: float | None = Field(None, ge=0, description="accuracy-aware fallback: keep the most sensitive Linear layers in FP until the validation main-metric drop vs the FP model <= this (absolute)")
    max_fallback_layers: int = Field(8, ge=0, description="at most this many Linear layers kept in FP by the fallback")
    target_flops: float | None = Field(None, gt=0, le=1, description="after conversion, re-fit the thresholds (one offset along the "
                                                                     "ramp) on the INT8 model so the deployed model runs at this relative FLOPs")

