"""End-to-end runs of tiny recipes (pipeline/runner.py, pipeline/cli.py `run`): stage folders,
reports, reproducibility, crash + resume, changed-recipe protection, --stop-after.

Every run uses a 2-layer d=32 model, 64 training / 32 dev examples of data/sst2_demo and one
epoch per stage (about a second per run on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ltp_compress.pipeline.cli import main
from ltp_compress.pipeline.recipe import RecipeError
from ltp_compress.pipeline.runner import RunError, run_recipe

from conftest import DEMO_DATA, write_recipe

TIMING_KEYS = {"examples_per_s"}


def _recipe(tmp_path: Path, model: Path, *, name="t", seed=1, stages=None, extra="") -> Path:
    stages = stages or """\
  - {id: ft, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3}
  - {id: soft, stage: ltp_soft, epochs: 1, batch_size: 16, final_threshold: 2.0, lambda: 0.5}
  - {id: hard, stage: ltp_hard, epochs: 1, batch_size: 16}
  - {id: ev, stage: evaluate}
"""
    text = f"""\
name: {name}
model: {model}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 64, max_dev_examples: 32, max_seq_length: 64}}
seed: {seed}
output_dir: {tmp_path / 'runs'}
num_threads: 1
{extra}stages:
{stages}"""
    return write_recipe(tmp_path / f"{name}.yaml", text)


def _stable_metrics(meta: dict) -> dict:
    return {split: {k: v for k, v in m.items() if k not in TIMING_KEYS} for split, m in meta["metrics"].items()}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _meta(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / "stages" / folder / "meta.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("full_run")
    recipe = _recipe(tmp, tiny_bert)
    return recipe, run_recipe(recipe, progress=False)


# ----------------------------------------------------------------------------- end to end


def test_full_run_layout(full_run):
    recipe, run_dir = full_run
    assert run_dir == recipe.parent / "runs" / "t"
    for f in ("recipe.json", "environment.json", "logs/run.log", "report.json", "report.md"):
        assert (run_dir / f).is_file(), f
    from ltp_compress.pipeline.environment import ENVIRONMENT_KEYS

    env = json.loads((run_dir / "report.json").read_text())["environment"]  # the block, with the load at the run's end
    assert set(ENVIRONMENT_KEYS) <= set(env) and env["loadavg_end"] is not None and env["packages"]["torch"]
    names = sorted(p.name for p in (run_dir / "stages").iterdir())
    assert names == ["00-ft", "01-soft", "02-hard", "03-ev"]  # no leftover .tmp-* folders
    for name in ("00-ft", "01-soft", "02-hard"):
        d = run_dir / "stages" / name
        assert (d / "meta.json").is_file() and (d / "model" / "model.safetensors").is_file()
        assert (d / "model" / "config.json").is_file() and (d / "model" / "pruning.json").is_file()
        meta = _meta(run_dir, name)
        assert meta["model_size_bytes"] == (d / "model" / "model.safetensors").stat().st_size
        assert meta["parameter_count"] > 0
    # evaluate produces metrics but no model
    assert (run_dir / "stages" / "03-ev" / "meta.json").is_file()
    assert not (run_dir / "stages" / "03-ev" / "model").exists()


def test_full_run_meta_chain(full_run):
    _, run_dir = full_run
    metas = {n: _meta(run_dir, n) for n in ("00-ft", "01-soft", "02-hard", "03-ev")}
    assert [m["id"] for m in metas.values()] == ["ft", "soft", "hard", "ev"]
    assert [m["index"] for m in metas.values()] == [0, 1, 2, 3]
    assert [m["source_stage"] for m in metas.values()] == [None, "ft", "soft", "hard"]
    assert metas["01-soft"]["source_model"] == str(run_dir / "stages" / "00-ft" / "model")
    assert metas["03-ev"]["source_model"] == str(run_dir / "stages" / "02-hard" / "model")
    assert metas["01-soft"]["config"]["lambda"] == 0.5  # saved by alias, as written
    for m in metas.values():
        dev = m["metrics"]["dev"]
        assert dev["num_examples"] == 32 and 0.0 <= dev["accuracy"] <= 1.0 and dev["main"] == dev["accuracy"]
    # the finetuned teacher is dense; the pruned stages remove tokens
    assert metas["00-ft"]["cost"]["relative_flops"] == 1.0
    soft_rule = metas["01-soft"]["extra"]["pruning"]
    assert soft_rule["mode"] == "threshold" and len(soft_rule["thresholds"]) == 2
    # ltp_hard keeps the thresholds ltp_soft learned; evaluate runs with them
    assert metas["02-hard"]["extra"]["pruning"] == soft_rule
    assert metas["03-ev"]["extra"]["pruning"] == soft_rule
    assert json.loads((run_dir / "stages" / "02-hard" / "model" / "pruning.json").read_text()) == soft_rule
    assert metas["02-hard"]["cost"]["relative_flops"] < 1.0
    # evaluate on the hard model measures what the hard stage reported
    assert _stable_metrics(metas["03-ev"]) == _stable_metrics(metas["02-hard"])
    assert metas["03-ev"]["cost"]["relative_flops"] == metas["02-hard"]["cost"]["relative_flops"]


def test_full_run_report(full_run):
    _, run_dir = full_run
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["id"] for s in report["stages"]] == ["ft", "soft", "hard", "ev"]
    assert [s["stage"] for s in report["stages"]] == ["finetune", "ltp_soft", "ltp_hard", "evaluate"]
    assert report["name"] == "t" and report["task"] == "sst2" and report["seed"] == 1
    hard = report["stages"][2]
    assert hard["cost"]["relative_flops"] == _meta(run_dir, "02-hard")["cost"]["relative_flops"]
    assert hard["pruning"]["mode"] == "threshold"
    md = (run_dir / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and " | " in line]
    for sid, typ in (("ft", "finetune"), ("soft", "ltp_soft"), ("hard", "ltp_hard"), ("ev", "evaluate")):
        assert sum(line.startswith(f"| {sid} | {typ} |") for line in rows) == 1, sid
    # validation (chosen on) and dev (test) side by side, both FLOPs conventions, the trivial baseline, the data summary
    data = json.loads((run_dir / "data.json").read_text())
    assert set(data["splits"]) == {"train", "validation", "dev"} and data["splits"]["validation"]["examples"] > 0
    assert report["data"] == data
    hard_row = next(line for line in rows if line.startswith("| hard | ltp_hard |")).split(" | ")
    assert float(hard_row[2]) == pytest.approx(hard["metrics"]["validation"]["main"], abs=1e-4)
    assert float(hard_row[3]) == pytest.approx(hard["metrics"]["dev"]["main"], abs=1e-4)
    assert float(hard_row[6]) == pytest.approx(hard["cost"]["by_convention"]["paper"]["relative_flops"], abs=1e-3)
    trivial = next(line for line in rows if line.startswith("| trivial baseline |")).split(" | ")
    assert float(trivial[2]) == pytest.approx(data["splits"]["validation"]["trivial_baseline"]["main"], abs=1e-4)


def test_report_command(full_run, capsys):
    _, run_dir = full_run
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| hard | ltp_hard |" in out
    assert main(["report", str(run_dir / "stages")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_same_seed_twice_identical(full_run, tmp_path, tiny_bert):
    recipe, run_dir = full_run
    again = run_recipe(recipe, [f"output_dir={tmp_path / 'again'}"], progress=False)
    assert again != run_dir
    for name in ("00-ft", "01-soft", "02-hard", "03-ev"):
        a, b = _meta(run_dir, name), _meta(again, name)
        assert _stable_metrics(a) == _stable_metrics(b), name
        assert a["cost"] == b["cost"], name
        assert a["extra"].get("pruning") == b["extra"].get("pruning"), name
    ta = _tensors(run_dir / "stages" / "02-hard" / "model" / "model.safetensors")
    tb = _tensors(again / "stages" / "02-hard" / "model" / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_different_seed_differs(full_run, tmp_path):
    recipe, run_dir = full_run
    other = run_recipe(recipe, [f"output_dir={tmp_path / 'other'}", "seed=2", "stages.soft.epochs=0.25",
                                "stages.hard.epochs=0.25"], progress=False, stop_after="ft")
    ta = _tensors(run_dir / "stages" / "00-ft" / "model" / "model.safetensors")
    tb = _tensors(other / "stages" / "00-ft" / "model" / "model.safetensors")
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)


def test_same_seed_identical_when_base_model_has_no_head(tmp_path, tiny_bert):
    """The recipe's model is a bare encoder (no classification head, as e.g. minilm-offline):
    the head is newly initialised when the finetune stage loads it. Same seed -> same head, even
    when the global RNG was used before (second run in the same process, e.g. a sweep)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tmp_path / "base"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert).bert.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(base)
    recipe = _recipe(tmp_path, base, stages="  - {id: ft, stage: finetune, epochs: 0.25, batch_size: 16}\n")
    torch.manual_seed(123)
    a = run_recipe(recipe, [f"output_dir={tmp_path / 'a'}"], progress=False)
    torch.rand(7)  # anything else that used the global RNG in between
    b = run_recipe(recipe, [f"output_dir={tmp_path / 'b'}"], progress=False)
    ta = _tensors(a / "stages" / "00-ft" / "model" / "model.safetensors")
    tb = _tensors(b / "stages" / "00-ft" / "model" / "model.safetensors")
    assert torch.equal(ta["classifier.weight"], tb["classifier.weight"])


# ----------------------------------------------------------------------------- crash and resume


def _crash_in(monkeypatch, stage_module: str, exc: BaseException):
    import importlib

    mod = importlib.import_module(f"ltp_compress.stages.{stage_module}")
    calls = []

    def crashing(cfg, ctx):
        calls.append(ctx.out_dir)
        (ctx.out_dir / "model").mkdir()
        (ctx.out_dir / "model" / "partial.bin").write_bytes(b"\0" * 100)
        raise exc

    monkeypatch.setattr(mod, "run", crashing)
    return calls


def test_crash_then_resume(tmp_path, tiny_bert, monkeypatch):
    stages = """\
  - {id: ft, stage: finetune, epochs: 0.5, batch_size: 16}
  - {id: soft, stage: ltp_soft, epochs: 0.5, batch_size: 16}
  - {id: hard, stage: ltp_hard, epochs: 0.5, batch_size: 16}
"""
    recipe = _recipe(tmp_path, tiny_bert, stages=stages)
    run_dir = tmp_path / "runs" / "t"
    calls = _crash_in(monkeypatch, "ltp_hard", RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe, progress=False)
    stages_dir = run_dir / "stages"
    assert calls == [stages_dir / ".tmp-02-hard"]
    assert sorted(p.name for p in stages_dir.iterdir()) == [".tmp-02-hard", "00-ft", "01-soft"]
    assert not (stages_dir / ".tmp-02-hard" / "meta.json").exists()
    assert (stages_dir / ".tmp-02-hard" / "model" / "partial.bin").is_file()
    mtimes = {n: (stages_dir / n / "meta.json").stat().st_mtime_ns for n in ("00-ft", "01-soft")}
    weights = {n: (stages_dir / n / "model" / "model.safetensors").stat().st_mtime_ns for n in ("00-ft", "01-soft")}

    monkeypatch.undo()
    run_recipe(recipe, progress=False)
    assert sorted(p.name for p in stages_dir.iterdir()) == ["00-ft", "01-soft", "02-hard"]
    assert {n: (stages_dir / n / "meta.json").stat().st_mtime_ns for n in mtimes} == mtimes
    assert {n: (stages_dir / n / "model" / "model.safetensors").stat().st_mtime_ns for n in weights} == weights
    assert not (stages_dir / "02-hard" / "model" / "partial.bin").exists()
    hard = _meta(run_dir, "02-hard")
    assert hard["source_model"] == str(stages_dir / "01-soft" / "model")
    assert hard["extra"]["pruning"] == _meta(run_dir, "01-soft")["extra"]["pruning"]
    log = (run_dir / "logs" / "run.log").read_text()
    assert "stage ft (finetune): already finished, skipped" in log
    assert "stage soft (ltp_soft): already finished, skipped" in log
    assert f"stage hard: removing an interrupted attempt {stages_dir / '.tmp-02-hard'}" in log
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["id"] for s in report["stages"]] == ["ft", "soft", "hard"]


def test_interrupt_via_cli_then_resume(tmp_path, tiny_bert, monkeypatch, capsys):
    stages = """\
  - {id: ft, stage: finetune, epochs: 0.5, batch_size: 16}
  - {id: soft, stage: ltp_soft, epochs: 0.5, batch_size: 16}
"""
    recipe = _recipe(tmp_path, tiny_bert, stages=stages)
    stages_dir = tmp_path / "runs" / "t" / "stages"
    _crash_in(monkeypatch, "ltp_soft", KeyboardInterrupt())
    assert main(["run", str(recipe), "--no-progress"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert sorted(p.name for p in stages_dir.iterdir()) == [".tmp-01-soft", "00-ft"]
    ft_mtime = (stages_dir / "00-ft" / "meta.json").stat().st_mtime_ns
    monkeypatch.undo()
    # short form: `ltp-compress RECIPE`
    assert main([str(recipe), "--no-progress"]) == 0
    assert sorted(p.name for p in stages_dir.iterdir()) == ["00-ft", "01-soft"]
    assert (stages_dir / "00-ft" / "meta.json").stat().st_mtime_ns == ft_mtime


def test_rerun_of_finished_run_is_noop(full_run):
    recipe, run_dir = full_run
    before = {p.name: (p / "meta.json").stat().st_mtime_ns for p in (run_dir / "stages").iterdir()}
    assert run_recipe(recipe, progress=False) == run_dir
    after = {p.name: (p / "meta.json").stat().st_mtime_ns for p in (run_dir / "stages").iterdir()}
    assert after == before


# ----------------------------------------------------------------------------- changed recipe


# ----------------------------------------------------------------------------- meta.json (typed: StageMeta)

SHORT_STAGES = """\
  - {id: ft, stage: finetune, epochs: 0.5, batch_size: 16}
  - {id: ev, stage: evaluate}
"""


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("short_run")
    return run_recipe(_recipe(tmp, tiny_bert, stages=SHORT_STAGES), progress=False)


def test_stage_meta_writer_writes_the_untyped_bytes(short_run, tmp_path):
    """Reading a meta.json the runner wrote and writing it again gives the same bytes (the typed writer
    writes what the untyped dict writer did); a stage without a model has no size / parameter keys."""
    from ltp_compress.pipeline.run_dir import read_stage_meta, write_stage_meta

    for folder in ("00-ft", "01-ev"):
        f = short_run / "stages" / folder / "meta.json"
        out = tmp_path / folder
        out.mkdir()
        write_stage_meta(out, read_stage_meta(f))
        assert (out / "meta.json").read_bytes() == f.read_bytes()
    assert read_stage_meta(short_run / "stages" / "00-ft").parameter_count > 0
    assert "model_size_bytes" not in _meta(short_run, "01-ev") and read_stage_meta(short_run / "stages" / "01-ev").model_size_bytes is None


def test_stage_meta_of_the_first_runner_loads(tmp_path):
    """meta.json as the first runner (7d0ce03) wrote it, with and without a model: every key since has the same name and type."""
    from ltp_compress.pipeline.run_dir import read_stage_meta

    first = {"id": "ft", "stage": "finetune", "index": 0, "config": {"id": "ft", "stage": "finetune", "epochs": 1.0},
             "source_model": "prajjwal1/bert-tiny", "source_stage": None,
             "metrics": {"validation": {"main": 0.5, "accuracy": 0.5}, "dev": {"main": 0.5}},
             "cost": {"relative_flops": 1.0}, "extra": {"parameter_count": 4386178},
             "wall_time_s": 12.5, "finished_at": "2026-11-24T10:00:00", "model_size_bytes": 17549312, "parameter_count": 4386178}
    (tmp_path / "meta.json").write_text(json.dumps(first, indent=2))
    meta = read_stage_meta(tmp_path / "meta.json")
    assert (meta.index, meta.id, meta.stage, meta.source_stage, meta.parameter_count) == (0, "ft", "finetune", None, 4386178)
    no_model = {k: v for k, v in first.items() if k not in ("model_size_bytes", "parameter_count")}
    (tmp_path / "meta.json").write_text(json.dumps({**no_model, "stage": "evaluate", "cost": None}, indent=2))
    assert read_stage_meta(tmp_path / "meta.json").model_size_bytes is None


@pytest.mark.parametrize("corrupt,field", [
    (lambda m: {**m, "metrics": [0.5]}, "'metrics'"),  # wrong type
    (lambda m: {**m, "index": "first"}, "'index'"),  # wrong type
    (lambda m: {**m, "surprise": 1}, "'surprise': Extra inputs are not permitted"),  # unknown key
    (lambda m: {k: v for k, v in m.items() if k != "stage"}, "'stage': Field required"),  # missing key
    (None, "not valid JSON"),
])
def test_corrupted_stage_meta_is_named_on_resume_and_in_report(short_run, tmp_path, tiny_bert, capsys, corrupt, field):
    import shutil

    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(short_run, run_dir)
    meta_file = run_dir / "stages" / "00-ft" / "meta.json"
    meta_file.write_text("{not json" if corrupt is None else json.dumps(corrupt(_meta(run_dir, "00-ft"))))
    with pytest.raises(RunError) as e:
        run_recipe(_recipe(tmp_path, tiny_bert, stages=SHORT_STAGES), progress=False)
    assert str(meta_file) in str(e.value) and field in str(e.value)
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(meta_file) in err and field in err


def test_changed_finished_stage_needs_overwrite(tmp_path, tiny_bert):
    stages = """\
  - {id: ft, stage: finetune, epochs: 0.5, batch_size: 16}
  - {id: soft, stage: ltp_soft, epochs: 0.5, batch_size: 16}
"""
    recipe = _recipe(tmp_path, tiny_bert, stages=stages)
    run_dir = run_recipe(recipe, progress=False)
    old_ft = _tensors(run_dir / "stages" / "00-ft" / "model" / "model.safetensors")
    with pytest.raises(RunError) as ei:
        run_recipe(recipe, ["stages.ft.lr=1e-3"], progress=False)
    assert "stages[0] (ft)" in str(ei.value) and "--overwrite" in str(ei.value)
    assert "stages[1]" not in str(ei.value)
    # nothing was touched
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["00-ft", "01-soft"]
    assert not list(run_dir.parent.glob("t.bak-*"))
    # a changed top-level field too
    with pytest.raises(RunError, match=r"changed: seed"):
        run_recipe(recipe, ["seed=5"], progress=False)
    # the CLI reports it as a user error (exit code 2)
    assert main(["run", str(recipe), "stages.ft.lr=1e-3", "--no-progress"]) == 2

    new_dir = run_recipe(recipe, ["stages.ft.lr=1e-3"], progress=False, overwrite=True)
    assert new_dir == run_dir
    baks = list(run_dir.parent.glob("t.bak-*"))
    assert len(baks) == 1
    kept = _tensors(baks[0] / "stages" / "00-ft" / "model" / "model.safetensors")
    assert all(torch.equal(kept[k], old_ft[k]) for k in old_ft)
    assert _meta(baks[0], "00-ft")["config"]["lr"] == 2e-5
    assert _meta(run_dir, "00-ft")["config"]["lr"] == 1e-3
    assert json.loads((run_dir / "recipe.json").read_text())["stages"][0]["lr"] == 1e-3


def test_changed_unfinished_stage_is_allowed(tmp_path, tiny_bert):
    stages = """\
  - {id: ft, stage: finetune, epochs: 0.5, batch_size: 16}
  - {id: soft, stage: ltp_soft, epochs: 0.5, batch_size: 16}
"""
    recipe = _recipe(tmp_path, tiny_bert, stages=stages)
    run_dir = run_recipe(recipe, progress=False, stop_after="ft")
    ft_mtime = (run_dir / "stages" / "00-ft" / "meta.json").stat().st_mtime_ns
    run_recipe(recipe, ["stages.soft.lambda=0.3"], progress=False)
    assert _meta(run_dir, "01-soft")["config"]["lambda"] == 0.3
    assert (run_dir / "stages" / "00-ft" / "meta.json").stat().st_mtime_ns == ft_mtime
    assert not list(run_dir.parent.glob("t.bak-*"))


# ----------------------------------------------------------------------------- --stop-after


def test_stop_after_then_continue(tmp_path, tiny_bert, capsys):
    recipe = _recipe(tmp_path, tiny_bert)
    run_dir = tmp_path / "runs" / "t"
    assert main(["run", str(recipe), "--stop-after", "soft", "--no-progress"]) == 0
    assert str(run_dir / "report.md") in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["00-ft", "01-soft"]
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["id"] for s in report["stages"]] == ["ft", "soft"]
    assert main(["run", str(recipe), "--no-progress"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["id"] for s in report["stages"]] == ["ft", "soft", "hard", "ev"]


def test_stop_after_unknown_stage(tmp_path, tiny_bert, capsys):
    recipe = _recipe(tmp_path, tiny_bert)
    with pytest.raises(RecipeError, match=r"--stop-after: 'sofft' is not a stage id"):
        run_recipe(recipe, progress=False, stop_after="sofft")
    assert not (tmp_path / "runs" / "t").exists()  # checked before anything is written
    assert main(["run", str(recipe), "--stop-after", "sofft"]) == 2
    assert "sofft" in capsys.readouterr().err


def test_run_refuses_missing_data_before_compute(tmp_path, tiny_bert):
    recipe = _recipe(tmp_path, tiny_bert)
    recipe.write_text(recipe.read_text().replace(str(DEMO_DATA), str(tmp_path / "missing_data")))
    with pytest.raises(RecipeError, match="cannot run") as ei:
        run_recipe(recipe, progress=False)
    assert str(tmp_path / "missing_data") in str(ei.value)
    assert not (tmp_path / "runs").exists()


def test_renamed_stage_leaves_no_stale_stage_in_report(tmp_path, tiny_bert):
    """Finished stage 01-soft; the recipe's stage 1 is then renamed to soft2. The old folder is
    not a stage of this recipe any more: the run must either refuse (RunError, like any other
    change to finished work) or report only the recipe's stages — never a row for 'soft' next to
    'soft2'."""
    stages = """\
  - {id: ft, stage: finetune, epochs: 0.5, batch_size: 16}
  - {id: soft, stage: ltp_soft, epochs: 0.5, batch_size: 16}
"""
    recipe = _recipe(tmp_path, tiny_bert, stages=stages)
    run_dir = run_recipe(recipe, progress=False)
    recipe.write_text(recipe.read_text().replace("id: soft,", "id: soft2,"))
    try:
        run_recipe(recipe, progress=False)
    except RunError as e:
        assert "soft" in str(e)
        return
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["id"] for s in report["stages"]] == ["ft", "soft2"]


@pytest.mark.parametrize("text, why", [("{", "unreadable (JSONDecodeError"), ("[1]", "expected a JSON object, found list")])
def test_report_of_a_run_whose_recipe_json_is_broken_names_the_file(tmp_path, capsys, text, why):
    from ltp_compress.pipeline.cli import main

    (tmp_path / "stages").mkdir()
    (tmp_path / "recipe.json").write_text(text)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "recipe.json: " in err and why in err
