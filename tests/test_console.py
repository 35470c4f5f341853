"""A run's console: no expected third-party noise, one line for a freshly initialised head, the
INT8 kernel that ran still named, and real loading problems still reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_DATA, build_tiny_model, write_recipe

NOISE = ("Failed to load", "_pytree", "is an Enum subclass", "LOAD REPORT", "Loading weights", "Writing model shards")


def _headless_encoder(folder: Path) -> Path:
    """A tiny pretrained-encoder folder without a task head (like a hub BERT checkpoint)."""
    from transformers import AutoModel

    cls_dir = build_tiny_model(folder / "with_head")
    AutoModel.from_pretrained(cls_dir).save_pretrained(folder / "encoder")
    for f in cls_dir.glob("*"):
        if f.name not in ("config.json", "model.safetensors"):
            (folder / "encoder" / f.name).write_bytes(f.read_bytes())
    return folder / "encoder"


def test_tiny_recipe_console_is_quiet_and_names_the_kernel(tmp_path):
    encoder = _headless_encoder(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
name: quiet
model: {encoder}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 32, max_dev_examples: 16, max_seq_length: 48}}
seed: 1
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
  - {{id: teacher, stage: finetune, epochs: 1, batch_size: 16}}
  - {{id: soft, stage: ltp_soft, epochs: 1, batch_size: 16, kd_teacher: teacher}}
  - {{id: hard, stage: ltp_hard, epochs: 1, batch_size: 16}}
  - {{id: int8, stage: quantize, calibration_batches: 1, calibration_batch_size: 16}}
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "ltp_compress.pipeline.cli", "run", str(recipe), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert not [n for n in NOISE if n in err], err
    assert err.count("head tensors freshly initialised (classifier.bias, classifier.weight)") == 1, err
    assert "int8: INT8 backend " in err and "kernels run: {'" in err, err  # the kernel that ran is named


def test_unexpected_load_problem_still_reported(tmp_path, caplog):
    """Negative control: an encoder weight missing from the checkpoint is not the expected case,
    so transformers' load report is shown unchanged."""
    from safetensors.torch import load_file, save_file

    from ltp_compress.modeling.model_io import load_classifier
    from ltp_compress.tasks.glue import get_task

    folder = build_tiny_model(tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["bert.encoder.layer.0.output.dense.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    said = []
    load_classifier(str(folder), get_task("sst2"), log=said.append)
    reports = [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "bert.encoder.layer.0.output.dense.weight" in reports[0]
    assert not said  # not announced as an expected fresh head
