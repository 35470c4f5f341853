"""The deployable checkpoint's file layout, its ltp.json (typed: `CheckpointInfo`, its one reader and
writer) and its verification, without torch (the ONNX export and runtime read checkpoints and must
stay light). Writing and loading the whole folder are in modeling/deploy.py."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from ltp_compress.errors import CheckpointError
from ltp_compress.json_model import load_json, parse_json_model, write_json_model
from ltp_compress.kernels.backends import ACTIVATION_RANGES, LEGACY_ACTIVATION_RANGE, QMAX
from ltp_compress.manifest import verify_manifest
from ltp_compress.sequence_length import DEFAULT_MAX_SEQ_LENGTH

FORMAT = "ltp-compress-deployable"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LTP_FILE = "ltp.json"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, LTP_FILE)

#: a key of kernels/backends.py ACTIVATION_RANGES
ActivationRange = Literal[tuple(ACTIVATION_RANGES)]
AttentionMatmuls = Literal["fp32", "int8"]


class QuantizationSection(BaseModel):
    """ltp.json's "quantization": what the quantiser did (modeling/quantized.py QuantInfo.to_dict) and
    the INT8 layers. Field order is the file's key order."""

    model_config = ConfigDict(extra="forbid")

    format: str | None = None  # modeling/quantized.py QUANT_FORMAT
    backend: str | None = None  # the concrete backend the checkpoint was converted for
    weight_qmax: int | None = None
    activation_qmax: int = QMAX
    #: checkpoints written between the activation_range setting (ddfd655) and 523929d: derivable, ignored
    activation_qmin: int | None = None
    #: the range of the quantised Linear inputs; absent: LEGACY_ACTIVATION_RANGE (written before the key existed)
    activation_range: ActivationRange = LEGACY_ACTIVATION_RANGE
    weights: str | None = None
    activations: str | None = None
    observer: str | None = None
    percentile: float | None = None
    calibration_batches: int | None = None
    #: older checkpoints only: the activation scales are the `<linear>.x_scale` tensors of model.safetensors
    #: (see `activation_scales`); when present they must agree with those
    act_scales: dict[str, float] | None = None
    fused_gelu: list[str] = Field(default_factory=list)  # FFN input Linear names whose kernel applies the GELU
    fp_layers: list[str] = Field(default_factory=list)  # Linear layers deliberately left float
    attention_matmuls: AttentionMatmuls = "fp32"
    attention_scales: dict[str, dict[str, float]] = Field(default_factory=dict)  # attention.self name -> q/k/v scale
    int8_layers: list[str]  # every Int8Linear, by module name

    @property
    def fuse_gelu(self) -> bool:
        """The quantize stage's `fuse_gelu` setting as the checkpoint shows it: some FFN kernel applies the GELU."""
        return bool(self.fused_gelu)

    @property
    def act_qmin(self) -> int:
        """The lower bound of the quantised Linear inputs (ACTIVATION_RANGES[activation_range])."""
        return ACTIVATION_RANGES[self.activation_range]


class CheckpointInfo(BaseModel):
    """A deployable checkpoint's ltp.json. Field order is the file's key order."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[FORMAT] = FORMAT
    format_version: Literal[FORMAT_VERSION] = FORMAT_VERSION
    pruning: dict[str, Any]  # modeling/pruned_encoder.py PruningConfig.to_dict()
    quantization: QuantizationSection
    max_seq_length: int = Field(DEFAULT_MAX_SEQ_LENGTH, ge=1)
    model_type: str | None = None  # the Hugging Face model_type (also in config.json)


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file against manifest.json; returns the manifest. Raises CheckpointError
    naming the file and what is wrong."""
    path = Path(path)
    hint = (" (this looks like a training-stage model folder, not a deployable checkpoint: use the quantize stage's output)"
            if (path / "pruning.json").is_file() else "")
    return verify_manifest(path, FORMAT, FORMAT_VERSION, REQUIRED_FILES, what="deployable checkpoint", missing_hint=hint)


def parse_checkpoint_info(obj, file: str | Path = LTP_FILE, error: type[CheckpointError] = CheckpointError) -> CheckpointInfo:
    """ltp.json's parsed JSON (or a CheckpointInfo, returned as is) as a CheckpointInfo; a file of another
    format or version, an unknown field or a wrong type raises `error` naming `file` and the field."""
    if isinstance(obj, CheckpointInfo):
        return obj
    if isinstance(obj, dict) and (obj.get("format") != FORMAT or obj.get("format_version") != FORMAT_VERSION):
        raise error(f"{file}: unsupported format {obj.get('format')!r} version {obj.get('format_version')!r} "
                    f"(this version reads {FORMAT!r} version {FORMAT_VERSION})")
    return parse_json_model(CheckpointInfo, obj, file, error)


def read_checkpoint_info(path: str | Path, error: type[CheckpointError] = CheckpointError, *, verify: bool = True) -> CheckpointInfo:
    """The checkpoint's ltp.json, after verifying every file against the manifest (`verify`): nothing is
    parsed before the bytes are known to be intact."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    return parse_checkpoint_info(load_json(path / LTP_FILE, error), path / LTP_FILE, error)


def write_checkpoint_info(folder: str | Path, info: CheckpointInfo) -> None:
    """ltp.json into `folder` (the fields that were set, in the model's order)."""
    write_json_model(Path(folder) / LTP_FILE, info)


def _float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def activation_scales(quantization: QuantizationSection, tensors: Mapping[str, Any], folder: str | Path = "",
                      error: type[CheckpointError] = CheckpointError) -> dict[str, float]:
    """{INT8 layer: its activation scale}: the one stored copy, the 0-d `<layer>.x_scale` tensor of
    model.safetensors (`tensors`: name -> torch or numpy tensor). An older checkpoint also lists them in
    ltp.json's quantization.act_scales (the calibrated value, stored as float32 in the tensor): each must
    round to its tensor exactly, else `error` names both."""
    folder = Path(folder)
    scales = {}
    for name in quantization.int8_layers:
        if f"{name}.x_scale" not in tensors:
            raise error(f"{folder / WEIGHTS_FILE}: tensor '{name}.x_scale' missing (the INT8 layer's activation scale)")
        scales[name] = float(tensors[f"{name}.x_scale"])
    for name, legacy in (quantization.act_scales or {}).items():
        if name in scales and _float32(legacy) != scales[name]:
            raise error(f"{folder / LTP_FILE}: 'quantization.act_scales.{name}' is {legacy!r}, but {WEIGHTS_FILE} "
                        f"'{name}.x_scale' is {scales[name]!r}: the two copies of the scale disagree")
    return scales
