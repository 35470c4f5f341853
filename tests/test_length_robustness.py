"""Length robustness, the LTP paper's Table III protocol: `data.train_shorter_than_quantile` (train on
examples shorter than a quantile of the validation token counts) and every evaluated split's results by
input length (`metrics[<split>]["by_length"]`: short ≤ Q2 < q2_q3 ≤ Q3 < long), in report.md and sweep.md."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import DEMO_DATA, write_recipe

KEY = "data.train_shorter_than_quantile"


def _split(lengths: list[int], name: str = "train", num_labels: int = 2):
    """A TokenizedSplit whose row i has `lengths[i]` tokens, token ids 1000·i + position (so rows are recognisable)."""
    from ltp_compress.tasks.data import TokenizedSplit

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.concatenate([1000 * i + np.arange(n) for i, n in enumerate(lengths)]).astype(np.int32)
    return TokenizedSplit(name, ids, offsets, np.zeros(len(ids), dtype=np.int8), np.arange(len(lengths)) % num_labels, num_labels,
                          truncated=1)


def _rows(ts) -> list[list[int]]:
    return [ts.ids[ts.offsets[i]:ts.offsets[i + 1]].tolist() for i in range(len(ts))]


def _hand_median(values) -> float:
    v = sorted(int(x) for x in values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


# ----------------------------------------------------------------------------- the training filter


def test_filter_keeps_exactly_the_rows_below_the_validation_quantile():
    from ltp_compress.tasks.splits import train_shorter_than

    train, validation = _split([2, 6, 5, 10, 7, 4]), _split([3, 5, 7, 9], "validation")
    full = _rows(train)
    kept, info = train_shorter_than(train, validation, 0.5, max_seq_length=10)
    # median of 3, 5, 7, 9 = 6: rows of 2, 5, 4 tokens (6 is not below 6)
    assert info["threshold_tokens"] == 6.0 and _rows(kept) == [full[0], full[2], full[5]]
    assert kept.lengths.tolist() == [2, 5, 4] and kept.labels.tolist() == [0, 0, 1]
    assert (info["train_examples_before"], info["train_examples_after"], info["key"]) == (6, 3, KEY)
    assert info["mean_tokens_before"] == pytest.approx(34 / 6) and info["mean_tokens_after"] == pytest.approx(11 / 3)
    assert kept.truncated == 0  # every kept row is shorter than max_seq_length: none was cut
    # the 0.25 quantile: 3 + 0.75·(5 - 3) = 4.5 -> rows of 2 and 4 tokens
    kept, info = train_shorter_than(train, validation, 0.25)
    assert info["threshold_tokens"] == 4.5 and _rows(kept) == [full[0], full[5]] and kept.truncated is None
    assert train.lengths.tolist() == [2, 6, 5, 10, 7, 4]  # the input split is unchanged


def test_filter_that_leaves_no_training_example_names_the_key():
    from ltp_compress.tasks.data import DataError
    from ltp_compress.tasks.splits import train_shorter_than

    with pytest.raises(DataError, match=rf"{KEY}: 0.1 leaves no training example.*3.6 tokens.*shortest.*has 4"):
        train_shorter_than(_split([4, 6, 9]), _split([3, 5, 7, 9], "validation"), 0.1)


def test_option_is_off_by_default_and_an_old_recipe_json_means_off(tmp_path):
    from pydantic import ValidationError

    from ltp_compress.pipeline.recipe import RecipeError, load_recipe
    from ltp_compress.pipeline.runner import _changed_keys
    from ltp_compress.tasks.data import DataConfig

    assert DataConfig().train_shorter_than_quantile is None
    for bad in (0, 1.5):
        with pytest.raises(ValidationError, match="train_shorter_than_quantile"):
            DataConfig(train_shorter_than_quantile=bad)
    path = write_recipe(tmp_path / "r.yaml", f"""\
name: r
model: {tmp_path}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}}}
stages:
  - {{id: ev, stage: evaluate}}
""")
    recipe = load_recipe(path)
    new = json.loads(recipe.model_dump_json(by_alias=True))
    head = {k: v for k, v in new.items() if k != "stages"}
    old = {**head, "data": {k: v for k, v in head["data"].items() if k != "train_shorter_than_quantile"}}  # before the key existed
    assert _changed_keys(old, head, recipe) == []
    filtered = load_recipe(path, [f"{KEY}=0.5"])
    assert filtered.data.train_shorter_than_quantile == 0.5
    assert _changed_keys(old, {k: v for k, v in json.loads(filtered.model_dump_json(by_alias=True)).items() if k != "stages"},
                         filtered) == ["data"]
    with pytest.raises(RecipeError, match="data.train_max_length: unknown key"):
        load_recipe(path, ["data.train_max_length=0.5"])


def _tiny_recipe(tmp_path, model, extra_data: str = "", name: str = "lr", stages: str = "  - {id: ev, stage: evaluate}\n"):
    return write_recipe(tmp_path / f"{name}.yaml", f"""\
name: {name}
model: {model}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 128, max_dev_examples: 64, max_validation_examples: 48,
        max_seq_length: 128{extra_data}}}
seed: 3
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
""" + stages)


def test_filter_on_the_demo_data_matches_a_hand_computation(tmp_path, tiny_bert):
    from ltp_compress.modeling.model_io import load_tokenizer
    from ltp_compress.pipeline.recipe import load_recipe
    from ltp_compress.pipeline.runner import load_task_data
    from ltp_compress.tasks.glue import get_task

    log, task, tok = logging.getLogger("test_length"), get_task("sst2"), load_tokenizer(str(tiny_bert))
    recipe = load_recipe(_tiny_recipe(tmp_path, tiny_bert))
    full, _ = load_task_data(recipe, task, tok, log)
    data, summary = load_task_data(load_recipe(_tiny_recipe(tmp_path, tiny_bert), [f"{KEY}=0.5"]), task, tok, log)
    median = _hand_median(full.validation.lengths)
    expected = [r for r in _rows(full.train) if len(r) < median]
    assert 0 < len(expected) < len(full.train)
    assert _rows(data.train) == expected
    f = summary["train_length_filter"]
    assert f["threshold_tokens"] == median and f["quantile"] == 0.5 and f["of"] == "validation"
    assert (f["train_examples_before"], f["train_examples_after"]) == (len(full.train), len(expected))
    assert summary["splits"]["train"]["examples"] == len(expected) and summary["splits"]["train"]["truncated"] == 0
    # validation and dev are not filtered
    assert _rows(data.validation) == _rows(full.validation) and _rows(data.dev["dev"]) == _rows(full.dev["dev"])


def test_run_stops_before_the_first_stage_when_the_filter_leaves_nothing(tmp_path, tiny_bert):
    """Every sentence has 5 one-letter words (7 tokens with [CLS] / [SEP]): no training row is shorter
    than any quantile of the validation counts."""
    from ltp_compress.pipeline.runner import run_recipe
    from ltp_compress.tasks.data import DataError

    folder = tmp_path / "same_length"
    folder.mkdir()
    letters = "bcdefghijklmnopqrstuvwxyz"
    rows = [" ".join(letters[(i + 3 * j) % 25] for j in range(5)) + f"\t{i % 2}" for i in range(40)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:8]) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
name: none_left
model: {tiny_bert}
task: sst2
data: {{source: glue_dir, path: {folder}, train_shorter_than_quantile: 0.9, cache: false}}
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
  - {{id: ft, stage: finetune, epochs: 1, batch_size: 16}}
""")
    with pytest.raises(DataError, match=rf"{KEY}: 0.9 leaves no training example.*7 tokens"):
        run_recipe(recipe, progress=False)
    assert not (tmp_path / "runs" / "none_left" / "stages").exists() or not any((tmp_path / "runs" / "none_left" / "stages").iterdir())


# ----------------------------------------------------------------------------- results by input length


def _check_slices(bl: dict, task, predictions, labels, lengths, cost: dict) -> None:
    """The slices partition the split by its own quartiles; their metrics are the metrics of their rows'
    predictions; the split's relative FLOPs is the dense-FLOPs-share-weighted sum of the slices'."""
    from ltp_compress.tasks.metrics import compute_metrics

    lengths = np.asarray(lengths)
    v = np.sort(lengths)
    n = len(v)

    def hand_quantile(q: float) -> float:  # linear interpolation between order statistics, by hand
        h = (n - 1) * q
        lo = int(np.floor(h))
        return float(v[lo] + (h - lo) * (v[min(lo + 1, n - 1)] - v[lo]))

    q2, q3 = hand_quantile(0.5), hand_quantile(0.75)
    assert bl["boundaries"] == {"q2_tokens": pytest.approx(q2), "q3_tokens": pytest.approx(q3)}
    masks = {"short": lengths <= q2, "q2_q3": (lengths > q2) & (lengths <= q3), "long": lengths > q3}
    assert sum(s["num_examples"] for s in bl["slices"].values()) == bl["num_examples"] == n
    for name, m in masks.items():
        sl = bl["slices"][name]
        assert sl["num_examples"] == int(m.sum())
        if m.any():
            assert sl["metrics"] == pytest.approx(compute_metrics(task, np.asarray(predictions)[m], np.asarray(labels)[m]))
            assert (sl["min_tokens"], sl["max_tokens"]) == (int(lengths[m].min()), int(lengths[m].max()))
        else:
            assert sl["metrics"] is None and sl["relative_flops"]["paper"] is None and sl["dense_flops_share"] == 0
    assert sum(s["dense_flops_share"] for s in bl["slices"].values()) == pytest.approx(1.0)
    for convention in ("executed", "paper"):
        combined = sum(s["dense_flops_share"] * s["relative_flops"][convention] for s in bl["slices"].values() if s["num_examples"])
        assert combined == pytest.approx(cost["by_convention"][convention]["relative_flops"], rel=1e-12)


def test_length_slices_partition_recompute_and_recombine():
    from ltp_compress.modeling.accounting import EncoderShape, Precision, cost_summary
    from ltp_compress.stages.length_slices import length_slices
    from ltp_compress.tasks.glue import get_task

    rng = np.random.default_rng(0)
    task, shape = get_task("mrpc"), EncoderShape(3, 32, 64)
    lengths = rng.integers(5, 60, size=101)
    kept = np.stack([lengths, np.ceil(lengths * 0.7), np.ceil(lengths * 0.4)], axis=1).astype(np.int64)
    kept[lengths > 40, 2] = 3  # long inputs pruned harder: the slices' relative FLOPs differ
    preds, labels = rng.integers(0, 2, size=101), rng.integers(0, 2, size=101)
    bl = length_slices(task, preds, labels, kept, lengths, shape)
    _check_slices(bl, task, preds, labels, lengths, cost_summary(kept, lengths, shape, Precision.uniform(32, 32)))
    assert bl["slices"]["long"]["relative_flops"]["paper"] < bl["slices"]["short"]["relative_flops"]["paper"]
    # equal lengths: Q2 = Q3 = n, every row is short, the other slices are empty
    same = np.full(8, 12)
    bl = length_slices(task, preds[:8], labels[:8], np.stack([same, same // 2, same // 2], 1), same, shape)
    assert [bl["slices"][s]["num_examples"] for s in ("short", "q2_q3", "long")] == [8, 0, 0]
    _check_slices(bl, task, preds[:8], labels[:8], same, cost_summary(np.stack([same, same // 2, same // 2], 1), same, shape,
                                                                       Precision.uniform(32, 32)))


def test_evaluate_cuts_its_own_pass_by_length(tmp_path, tiny_bert):
    """`evaluate` gives every split's slices from the predictions and token counts of the pass behind
    the split's metrics and cost; the stage result carries them in metrics, the training-time metrics
    (history) do not."""
    from ltp_compress.modeling.model_io import load_stage_model, load_tokenizer
    from ltp_compress.modeling.pruned_encoder import PruningConfig
    from ltp_compress.pipeline.recipe import load_recipe
    from ltp_compress.pipeline.runner import load_task_data
    from ltp_compress.stages.common import evaluate
    from ltp_compress.stages.context import StageContext
    from ltp_compress.tasks.glue import get_task
    from ltp_compress.tasks.metrics import compute_metrics

    log, task = logging.getLogger("test_length"), get_task("sst2")
    data, _ = load_task_data(load_recipe(_tiny_recipe(tmp_path, tiny_bert)), task, load_tokenizer(str(tiny_bert)), log)
    ctx = StageContext(task=task, data=data, out_dir=tmp_path / "o", final_dir=tmp_path / "f", source_model=str(tiny_bert),
                       stage_models={"model": str(tiny_bert)}, seed=0, log=log, max_seq_length=128, progress=False)
    model, _, _ = load_stage_model(str(tiny_bert), task)
    ev = evaluate(model, ctx, PruningConfig(mode="topk", keep_ratios=[0.5, 0.5]), 16)
    result = ev.result()
    assert all("by_length" not in m for m in ev.metrics.values())
    for split in ("validation", "dev"):
        res, labels = ev.per_example[split], np.asarray(data.eval_split(split).labels)
        assert compute_metrics(task, res.predictions, labels)["main"] == ev.metrics[split]["main"]
        assert res.lengths.tolist() == data.eval_split(split).lengths.tolist()
        _check_slices(result.metrics[split]["by_length"], task, res.predictions, labels, res.lengths, ev.costs[split])
    assert ev.costs["dev"]["by_convention"]["paper"]["relative_flops"] < 1.0


def test_tiny_run_reports_dev_by_input_length(tmp_path, tiny_bert):
    from ltp_compress.pipeline.runner import run_recipe

    recipe = _tiny_recipe(tmp_path, tiny_bert, f", {KEY.split('.')[1]}: 0.5", name="tl", stages="""\
  - {id: ft, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3}
  - {id: soft, stage: ltp_soft, epochs: 1, batch_size: 16, target_flops: 0.6, flops_convention: paper}
  - {id: topk, stage: topk_prune, init_from: ft, dense_layers: 0, target_flops: 0.6, flops_convention: paper}
""")
    run_dir = run_recipe(recipe, progress=False)
    data = json.loads((run_dir / "data.json").read_text())
    f = data["train_length_filter"]
    assert data["splits"]["train"]["examples"] == f["train_examples_after"] < f["train_examples_before"]
    for folder in ("00-ft", "01-soft", "02-topk"):
        meta = json.loads((run_dir / "stages" / folder / "meta.json").read_text())
        for split in ("validation", "dev"):
            bl = meta["metrics"][split]["by_length"]
            assert sum(s["num_examples"] for s in bl["slices"].values()) == meta["metrics"][split]["num_examples"]
        cost = meta["cost"]
        for convention in ("executed", "paper"):
            slices = meta["metrics"]["dev"]["by_length"]["slices"].values()
            assert sum(s["dense_flops_share"] * s["relative_flops"][convention] for s in slices if s["num_examples"]) == \
                pytest.approx(cost["by_convention"][convention]["relative_flops"])
    md = (run_dir / "report.md").read_text()
    section = md.split("## Dev by input length (quartiles of dev token counts)")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| stage | short main | short rel. FLOPs paper | q2_q3 main")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| ft", "| soft", "| topk"]  # (the |---| line is not a "| " row)
    topk = json.loads((run_dir / "stages" / "02-topk" / "meta.json").read_text())["metrics"]["dev"]["by_length"]["slices"]
    cells = rows[3].split(" | ")
    assert float(cells[1]) == pytest.approx(topk["short"]["metrics"]["main"], abs=1e-4)
    assert float(cells[6].rstrip(" |")) == pytest.approx(topk["long"]["relative_flops"]["paper"], abs=1e-3)
    assert "train: only examples shorter than" in md and f"{f['train_examples_after']} of {f['train_examples_before']} kept" in md


# ----------------------------------------------------------------------------- sweep.md and old runs


def _stage(sid: str, stage: str, rel: float, dev: float, long_main: float | None):
    conv = {c: {"relative_flops": rel, "relative_bops_vs_fp16_dense": rel / 4} for c in ("executed", "paper")}
    metrics = {"validation": {"main": dev}, "dev": {"main": dev}}
    if long_main is not None:
        sl = {name: {"num_examples": 4, "metrics": {"main": m}, "relative_flops": {"executed": rel, "paper": rel}, "dense_flops_share": 1 / 3}
              for name, m in (("short", dev), ("q2_q3", dev), ("long", long_main))}
        metrics["dev"]["by_length"] = {"boundaries": {"q2_tokens": 20.0, "q3_tokens": 30.0}, "slices": sl, "num_examples": 12}
    return {"id": sid, "stage": stage, "metrics": metrics, "cost": {"by_convention": conv}}


def test_sweep_tables_per_slice_with_drops_vs_the_seeds_reference():
    from ltp_compress.pipeline.report import render_markdown
    from ltp_compress.pipeline.sweep import add_slice_drops, aggregate_over_seeds, render_sweep, sweep_rows

    rows = []
    for seed, (ref_long, topk_long) in {1: (0.80, 0.60), 2: (0.90, 0.80)}.items():
        report = {"stages": [_stage("base", "evaluate", 1.0, 0.85, ref_long), _stage("topk", "topk_prune", 0.4, 0.80, topk_long)]}
        rows += sweep_rows(report, point=0, overrides=[], seed=seed, run_dir="r")
    rows = add_slice_drops(rows)
    assert [r["dev_long_drop"] for r in rows if r["id"] == "topk"] == pytest.approx([0.20, 0.10])
    summary = aggregate_over_seeds(rows)
    topk = next(r for r in summary if r["id"] == "topk")
    assert topk["dev_long_drop"]["mean"] == pytest.approx(0.15) and topk["dev_long_drop"]["sd"] == pytest.approx(np.std([0.2, 0.1], ddof=1))
    md = render_sweep({"recipe": "x", "grid": [], "seeds": [1, 2], "rows": rows, "summary": summary, "failures": [], "plot": "p.png"})
    long_table = md.split("### long (n > Q3)")[1].split("###")[0]
    assert "| topk (topk_prune) | 0 | `` | 70.00 ± 14.14 | 15.00 ± 7.07 | 0.400 |" in long_table
    assert "| base (evaluate, unpruned) | 0 | `` | 85.00 ± 7.07 | - |" in long_table
    # runs from before the slices: no slice table, no slice keys, the report has no by-length section
    old = sweep_rows({"stages": [_stage("base", "evaluate", 1.0, 0.85, None)]}, point=0, overrides=[], seed=1, run_dir="r")
    assert not any(k.startswith("dev_long") for k in old[0])
    assert "Dev by input length" not in render_sweep({"recipe": "x", "grid": [], "seeds": [1], "rows": old,
                                                       "summary": aggregate_over_seeds(old), "failures": [], "plot": "p.png"})
    assert "Dev by input length" not in render_markdown({"name": "n", "task": "t", "model": "m", "seed": 0,
                                                         "stages": [_stage("base", "evaluate", 1.0, 0.85, None)]})
    assert "Dev by input length" in render_markdown({"name": "n", "task": "t", "model": "m", "seed": 0,
                                                     "stages": [_stage("base", "evaluate", 1.0, 0.85, 0.8)]})
