"""Mid-stage resume (stages/checkpoint.py, pipeline/run_dir.py): a training stage killed after step
k and rerun resumes from its last checkpoint and ends with bitwise the same weights, thresholds,
QAT activation scales and metrics as an uninterrupted run (one process, CPU, dropout on).

The interruption is `LTP_DEBUG_FAIL_AT=STAGE:STEP` (stages/distributed.py), which raises right after
that global step; every training stage type is interrupted once, between two checkpoints (so the
rerun redoes steps), in one chain: finetune across an epoch boundary with keep_best state,
ltp_soft with λ steering + final calibration, ltp_hard with threshold re-fits, quant-aware distill.
Tiny model (2 layers, d=32), 72 training examples, batch 16: 5 steps per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ltp_compress.pipeline.runner import run_recipe
from ltp_compress.stages import distributed as dist
from ltp_compress.stages.checkpoint import load_checkpoint

from conftest import DEMO_DATA, write_recipe

STAGES = """\
  - {id: ft, stage: finetune, epochs: 2, batch_size: 16, lr: 1.0e-3, checkpoint_every_steps: 2}
  - {id: soft, stage: ltp_soft, epochs: 1, batch_size: 16, final_threshold: 2.0, lambda: 0.5, target_flops: 0.7, checkpoint_every_steps: 2}
  - {id: hard, stage: ltp_hard, epochs: 1, batch_size: 16, target_flops: 0.7, retargets: 2, retarget_until: 0.8, checkpoint_every_steps: 2}
  - {id: kd, stage: distill, epochs: 1, batch_size: 16, kd_teacher: ft, quant_aware: true, checkpoint_every_steps: 2}
"""
FOLDERS = ("00-ft", "01-soft", "02-hard", "03-kd")
#: (stage, step it fails after, the checkpoint step it resumes from)
FAILURES = (("ft", 7, 6), ("soft", 3, 2), ("hard", 5, 4), ("kd", 3, 2))


def _recipe(tmp_path: Path, model: Path, name: str) -> Path:
    return write_recipe(tmp_path / f"{name}.yaml", f"""\
name: {name}
model: {model}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 72, max_dev_examples: 32, max_seq_length: 64}}
seed: 3
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
{STAGES}""")


def _outputs(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in FOLDERS:
        model = run_dir / "stages" / f / "model"
        meta = json.loads((run_dir / "stages" / f / "meta.json").read_text())
        out[f] = {"weights": load_file(str(model / "model.safetensors")),
                  "pruning": json.loads((model / "pruning.json").read_text()),
                  "act_scales": json.loads((model / "act_scales.json").read_text()) if (model / "act_scales.json").is_file() else None,
                  "metrics": {s: {k: v for k, v in m.items() if k != "examples_per_s"} for s, m in meta["metrics"].items()},
                  "train_steps": meta["extra"]["train_steps"]}
    return out


def test_killed_stages_resume_bitwise(tmp_path, tiny_bert, monkeypatch):
    reference = _outputs(run_recipe(_recipe(tmp_path, tiny_bert, "straight"), progress=False))

    recipe = _recipe(tmp_path, tiny_bert, "killed")
    run_dir = tmp_path / "runs" / "killed"
    for stage, fail_step, _ in FAILURES:
        monkeypatch.setenv(dist.ENV_FAIL_AT, f"{stage}:{fail_step}")
        with pytest.raises(RuntimeError, match=f"injected failure after step {fail_step} of stage {stage}"):
            run_recipe(recipe, progress=False)
        index = [s for s, _, _ in FAILURES].index(stage)
        tmp = run_dir / "stages" / f".tmp-{index:02d}-{stage}"
        assert (tmp / "checkpoint" / "state.json").is_file(), stage
    monkeypatch.delenv(dist.ENV_FAIL_AT)
    run_recipe(recipe, progress=False)

    log = (run_dir / "logs" / "run.log").read_text()
    for stage, _, resumed_at in FAILURES:
        assert f"{stage}: resuming from the checkpoint at step {resumed_at} of" in log
    stages_dir = run_dir / "stages"
    assert sorted(p.name for p in stages_dir.iterdir()) == list(FOLDERS)  # no tmp folders left
    assert not any((stages_dir / f / "checkpoint").exists() for f in FOLDERS)  # checkpoints removed on publish

    resumed = _outputs(run_dir)
    for f in FOLDERS:
        a, b = reference[f], resumed[f]
        assert a["weights"].keys() == b["weights"].keys()
        diff = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
        assert not diff, f"{f}: tensors differ after resume: {diff[:5]}"
        assert a["pruning"] == b["pruning"], f
        assert a["act_scales"] == b["act_scales"], f
        assert a["metrics"] == b["metrics"], f
        assert a["train_steps"] == b["train_steps"], f
    assert reference["03-kd"]["act_scales"] is not None  # the QAT observer state went through a resume


def test_checkpoint_config_must_match(tmp_path, tiny_bert, monkeypatch):
    """A checkpoint is used only by the same stage config (checkpoint_every_steps may change)."""
    recipe = _recipe(tmp_path, tiny_bert, "cfg")
    monkeypatch.setenv(dist.ENV_FAIL_AT, "ft:3")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_recipe(recipe, progress=False, stop_after="ft")
    tmp = tmp_path / "runs" / "cfg" / "stages" / ".tmp-00-ft"
    from ltp_compress.pipeline.recipe import load_recipe

    cfg = load_recipe(recipe).stages[0]
    assert load_checkpoint(tmp, cfg).step == 2
    assert load_checkpoint(tmp, cfg.model_copy(update={"checkpoint_every_steps": 5})).step == 2
    assert load_checkpoint(tmp, cfg.model_copy(update={"lr": 5.0e-4})) is None
    # the runner keeps only checkpoint/ of an interrupted attempt
    (tmp / "model").mkdir(exist_ok=True)
    (tmp / "model" / "partial.bin").write_bytes(b"x")
    monkeypatch.delenv(dist.ENV_FAIL_AT)
    run_recipe(recipe, progress=False, stop_after="ft")
    final = tmp_path / "runs" / "cfg" / "stages" / "00-ft"
    assert not (final / "model" / "partial.bin").exists() and not (final / "checkpoint").exists()
    assert "ft: resuming from the checkpoint at step 2 of 10" in (tmp_path / "runs" / "cfg" / "logs" / "run.log").read_text()


def test_checkpoint_every_steps_zero_writes_none(tmp_path, tiny_bert, monkeypatch):
    recipe = _recipe(tmp_path, tiny_bert, "nockpt")
    recipe.write_text(recipe.read_text().replace("checkpoint_every_steps: 2", "checkpoint_every_steps: 0"))
    monkeypatch.setenv(dist.ENV_FAIL_AT, "ft:4")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_recipe(recipe, progress=False, stop_after="ft")
    tmp = tmp_path / "runs" / "nockpt" / "stages" / ".tmp-00-ft"
    assert tmp.is_dir() and not (tmp / "checkpoint").exists()
    monkeypatch.delenv(dist.ENV_FAIL_AT)
    run_recipe(recipe, progress=False, stop_after="ft")
    assert "ft: removing an interrupted attempt" in (tmp_path / "runs" / "nockpt" / "logs" / "run.log").read_text()


def _two_quantize_stages(tmp_path, second: str):
    """Two quantize stages of a minimal recipe, the second with `second` settings: [(stage, its JSON dump)]."""
    import json

    from ltp_compress.pipeline.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(f"""\
name: r
model: m
task: sst2
data: {{source: glue_dir, path: d}}
stages:
  - {{id: q, stage: quantize}}
  - {{id: q2, stage: quantize, {second}}}
""")
    return [(st, json.loads(st.model_dump_json(by_alias=True))) for st in load_recipe(tmp_path / "r.yaml").stages]


def test_a_setting_added_later_at_its_default_does_not_change_a_finished_stage(tmp_path):
    """Resume compares finished stages' stored configs with the recipe; a key the stored config
    lacks (a setting a later version added) is equal only at its default."""
    from ltp_compress.pipeline.runner import _changed_keys

    (q, new_q), (q8, new_q8) = _two_quantize_stages(tmp_path, "attention_matmuls: int8")
    old = {k: v for k, v in new_q.items() if k != "attention_matmuls"}  # stored before the setting existed
    assert not _changed_keys(old, new_q, q)
    assert _changed_keys({**old, "id": "q2"}, new_q8, q8)  # the recipe moved it off its default
    assert _changed_keys({**old, "observer": "percentile"}, new_q, q)
    assert _changed_keys({**new_q, "removed_key": 1}, new_q, q)


def test_a_setting_whose_default_is_not_the_old_behaviour_resumes_only_where_the_recipe_pins_it(tmp_path):
    """quantize's activation_range defaults to 'full', but a stage finished before the setting existed
    quantised to [-127, 127]: its stored config (no key) equals 'symmetric', not the default, so a
    recipe must pin 'symmetric' to resume it and a recipe at the default re-runs it (changed)."""
    from ltp_compress.pipeline.runner import _changed_keys

    (q, new_q), (qs, new_qs) = _two_quantize_stages(tmp_path, "activation_range: symmetric")
    assert new_q["activation_range"] == "full"
    old = {k: v for k, v in new_q.items() if k != "activation_range"}  # stored before the setting existed
    assert _changed_keys(old, new_q, q) == ["activation_range"]
    assert not _changed_keys({**old, "id": "q2"}, new_qs, qs)


def test_a_recipe_starting_from_another_runs_model_must_carve_that_runs_validation(tmp_path, tiny_bert):
    """Starting from `<run>/stages/NN-id/model` on the same data with another split seed would validate
    on rows that model trained on: preflight names data.split_seed; pinning it passes. A data setting
    added later (split_seed), at its default, leaves a finished run resumable."""
    import json
    import shutil

    from conftest import DEMO_DATA

    from ltp_compress.pipeline.recipe import load_recipe
    from ltp_compress.pipeline.run_dir import RunDir
    from ltp_compress.pipeline.runner import _check_resume, preflight

    teacher_run = tmp_path / "runs" / "chain"
    shutil.copytree(tiny_bert, teacher_run / "stages" / "00-teacher" / "model")
    old_data = {"source": "glue_dir", "path": str(DEMO_DATA), "validation_fraction": 0.1, "max_validation_examples": 1000}
    (teacher_run / "recipe.json").write_text(json.dumps({"name": "chain", "task": "sst2", "seed": 42, "data": old_data}))
    recipe_path = tmp_path / "sweep.yaml"
    recipe_path.write_text(f"""\
name: sweep
model: {teacher_run / 'stages' / '00-teacher' / 'model'}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}}}
seed: 42
stages:
  - {{id: base, stage: evaluate}}
""")
    assert preflight(load_recipe(recipe_path), recipe_path)[1] == []  # same seed: same split
    problems = preflight(load_recipe(recipe_path, ["seed=1"]), recipe_path)[1]
    assert len(problems) == 1 and "set data.split_seed: 42" in problems[0]
    assert preflight(load_recipe(recipe_path, ["seed=1", "data.split_seed=42"]), recipe_path)[1] == []
    # resume: the finished run's stored data lacks split_seed (an older version); at its default it is unchanged
    recipe, _ = preflight(load_recipe(recipe_path), recipe_path)
    run = RunDir(tmp_path / "runs" / "sweep")
    (run.path / "stages").mkdir(parents=True)
    stored = json.loads(recipe.model_dump_json(by_alias=True))
    del stored["data"]["split_seed"]
    (run.path / "recipe.json").write_text(json.dumps(stored))
    assert _check_resume(run, recipe, overwrite=False) is None
    recipe42, _ = preflight(load_recipe(recipe_path, ["data.split_seed=7"]), recipe_path)
    with pytest.raises(Exception, match="changed: data"):
        _check_resume(run, recipe42, overwrite=False)
