"""`ltp-compress sweep`: zipped grids, several seeds aggregated as mean ± sd, both FLOPs conventions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DEMO_DATA, write_recipe


def _sweep_recipe(tmp_path, tiny_bert, stages: str, train: int = 32, held_out: int = 24):
    """A recipe named `sw` on the tiny BERT and the demo data, runs under tmp_path/runs; `stages` is its YAML list."""
    return write_recipe(tmp_path / "s.yaml", f"""\
name: sw
model: {tiny_bert}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: {train}, max_dev_examples: {held_out},
        max_validation_examples: {held_out}, max_seq_length: 48}}
seed: 0
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
""" + stages)


def test_parse_grid_zips_and_broadcasts():
    from ltp_compress.pipeline.recipe import RecipeError
    from ltp_compress.pipeline.sweep import parse_grid

    assert parse_grid(["a=1,2", "b=x"]) == [["a=1", "b=x"], ["a=2", "b=x"]]
    with pytest.raises(RecipeError, match="equal lengths"):
        parse_grid(["a=1,2", "b=x,y,z"])
    # a YAML list is one value: its commas do not split the grid
    assert parse_grid(["skip_stages=[soft,hard],[]", "a=1"]) == [["skip_stages=[soft,hard]", "a=1"], ["skip_stages=[]", "a=1"]]
    assert parse_grid(["skip_stages=[soft,hard]"]) == [["skip_stages=[soft,hard]"]]
    with pytest.raises(RecipeError, match=r"skip_stages=\[soft,hard'.*unbalanced"):
        parse_grid(["skip_stages=[soft,hard"])


def test_sweep_over_seeds_aggregates_mean_and_sd(tmp_path, tiny_bert):
    from ltp_compress.pipeline.cli import main

    recipe = _sweep_recipe(tmp_path, tiny_bert, """\
  - {id: ft, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3}
  - {id: man, stage: manual_prune, final_threshold: 1.0}
""")
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), "--grid", "stages.man.final_threshold=2.0,3.0", "--seeds", "1,2",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert res["seeds"] == [1, 2] and len(res["rows"]) == 2 * 2 * 2  # points x seeds x stages
    from ltp_compress.pipeline.environment import ENVIRONMENT_KEYS

    assert set(ENVIRONMENT_KEYS) <= set(res["environment"]) and "environment: CPU" in (out / "sweep.md").read_text()
    assert (tmp_path / "runs" / "sw-p1-s2" / "report.md").is_file()
    for agg in res["summary"]:
        rows = [r for r in res["rows"] if r["point"] == agg["point"] and r["id"] == agg["id"]]
        assert sorted(agg["seeds"]) == [1, 2]
        for key in ("dev_main", "validation_main", "relative_flops_paper", "relative_flops_executed"):
            v = np.array([r[key] for r in rows])
            assert agg[key]["mean"] == pytest.approx(v.mean()) and agg[key]["sd"] == pytest.approx(v.std(ddof=1))
    man = [r for r in res["rows"] if r["id"] == "man"]
    # the paper convention charges the output projection of pruned tokens: never less than executed
    assert all(r["relative_flops_paper"] >= r["relative_flops_executed"] for r in man)
    assert any(r["relative_flops_paper"] > r["relative_flops_executed"] for r in man)
    md = (out / "sweep.md").read_text()
    assert "±" in md and "rel. FLOPs paper" in md and (out / "accuracy_vs_flops.png").is_file()


def test_sweep_records_a_point_that_stops_on_a_user_error_and_goes_on(tmp_path, tiny_bert):
    """Top-k with a dense first layer cannot reach a tiny FLOPs level: that point stops before its
    first stage (the runner checks the level once the data is loaded), its error is recorded, and
    the later point runs."""
    from ltp_compress.pipeline.cli import main

    recipe = _sweep_recipe(tmp_path, tiny_bert, """\
  - {id: base, stage: evaluate}
  - {id: topk, stage: topk_prune, dense_layers: 1, target_flops: 0.9, flops_convention: paper}
""")
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), "--grid", "stages.topk.target_flops=0.9,0.05,0.95", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "sweep.json").read_text())
    assert [f["point"] for f in res["failures"]] == [1] and "below what top-k" in res["failures"][0]["error"]
    assert sorted((r["point"], r["id"]) for r in res["rows"]) == [(0, "base"), (0, "topk"), (2, "base"), (2, "topk")]
    assert "stopped on a user error" in (out / "sweep.md").read_text()


def test_sweep_name_prefixes_the_runs_so_two_studies_of_one_recipe_do_not_collide(tmp_path, tiny_bert):
    from ltp_compress.pipeline.cli import main

    recipe = _sweep_recipe(tmp_path, tiny_bert, "  - {id: man, stage: manual_prune, final_threshold: 1.0}\n", train=16, held_out=16)
    assert main(["sweep", str(recipe), "--grid", "stages.man.final_threshold=2.0", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert main(["sweep", str(recipe), "--name", "study_b", "--grid", "stages.man.final_threshold=3.0", "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 0
    runs = {p.name for p in (tmp_path / "runs").iterdir()}
    assert {"sw-p0", "study_b-p0"} <= runs
    a = json.loads((tmp_path / "a" / "sweep.json").read_text())["rows"]
    b = json.loads((tmp_path / "b" / "sweep.json").read_text())["rows"]
    assert a[0]["run_dir"].endswith("sw-p0") and b[0]["run_dir"].endswith("study_b-p0")
    assert a[0]["relative_flops_paper"] != b[0]["relative_flops_paper"]  # each its own run, not the other's resumed


@pytest.mark.parametrize("seeds, why", [("a,b", "expected comma-separated integers"), ("1,1", "a seed is given twice"), (",", "no seed given")])
def test_bad_seed_list_is_a_usage_error_before_any_run(tmp_path, capsys, seeds, why):
    from ltp_compress.pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sweep", str(tmp_path / "missing.yaml"), "--seeds", seeds, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
