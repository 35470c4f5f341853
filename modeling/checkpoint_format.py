"""The deployable checkpoint's file layout and its verification, without torch (the ONNX export
and runtime read checkpoints and must stay light). Writing and loading are in modeling/deploy.py."""

from __future__ import annotations

import json
from pathlib import Path

from ltp_compress.errors import CheckpointError
from ltp_compress.kernels.backends import ACTIVATION_RANGES, LEGACY_ACTIVATION_RANGE
from ltp_compress.manifest import verify_manifest

FORMAT = "ltp-compress-deployable"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LTP_FILE = "ltp.json"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, LTP_FILE)


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file against manifest.json; returns the manifest. Raises CheckpointError
    naming the file and what is wrong."""
    path = Path(path)
    hint = (" (this looks like a training-stage model folder, not a deployable checkpoint: use the quantize stage's output)"
            if (path / "pruning.json").is_file() else "")
    return verify_manifest(path, FORMAT, FORMAT_VERSION, REQUIRED_FILES, what="deployable checkpoint", missing_hint=hint)


def activation_range(quantization: dict, path: str | Path = "", error: type[CheckpointError] = CheckpointError) -> str:
    """The range of the checkpoint's quantised Linear inputs from ltp.json's `quantization.activation_range`
    (a key of kernels/backends.py ACTIVATION_RANGES; absent: LEGACY_ACTIVATION_RANGE, a checkpoint written
    before the key existed). Anything else raises `error` naming the file and the key."""
    name = quantization.get("activation_range", LEGACY_ACTIVATION_RANGE)
    if name not in ACTIVATION_RANGES:
        raise error(f"{Path(path) / LTP_FILE}: 'quantization.activation_range' is {name!r}; this version knows {sorted(ACTIVATION_RANGES)}")
    return name


def read_deployable_info(path: str | Path) -> dict:
    """The checkpoint's ltp.json (pruning rule, quantisation info, max_seq_length), after verifying
    every file against the manifest: nothing is parsed before the bytes are known to be intact."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        ltp = json.loads((path / LTP_FILE).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path / LTP_FILE}: not valid JSON: {e}") from None
    if ltp.get("format") != FORMAT or ltp.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / LTP_FILE}: unsupported format {ltp.get('format')!r} version {ltp.get('format_version')!r}")
    return ltp
