"""End-to-end benchmark (pipeline/bench.py) on a tiny run directory: our torch systems + the HF FP32 baseline (sdpa).
The ONNX Runtime / OpenVINO peers and ours on ONNX Runtime: tests/test_bench_peers.py."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_DATA, write_recipe

from ltp_compress.kernels import KERNEL_COUNTER

SYSTEMS = ["hf_fp32_sdpa", "ltp_fp32", "dense_int8", "ltp_int8"]


_RUNS: dict = {}  # the tiny run is built once per session and shared with tests/test_bench_peers.py (read only)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bert):
    if "run" not in _RUNS:
        _RUNS["run"] = _make_tiny_run(tmp_path_factory, tiny_bert)
    return _RUNS["run"]


def _make_tiny_run(tmp_path_factory, tiny_bert):
    from ltp_compress.pipeline.runner import run_recipe

    tmp = tmp_path_factory.mktemp("bench_run")
    recipe = write_recipe(tmp / "bench.yaml", f"""\
name: bench
model: {tiny_bert}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 64, max_dev_examples: 32, max_seq_length: 64}}
seed: 1
output_dir: {tmp / 'runs'}
num_threads: 1
stages:
  - {{id: teacher, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3}}
  - {{id: soft, stage: ltp_soft, epochs: 1, batch_size: 16, final_threshold: 1.0, lambda: 0.5}}
  - {{id: hard, stage: ltp_hard, epochs: 1, batch_size: 16}}
  - {{id: int8, stage: quantize, calibration_batches: 2, calibration_batch_size: 16}}
""")
    return run_recipe(recipe, progress=False)


@pytest.fixture(scope="module")
def bench(tiny_run, tmp_path_factory):
    from ltp_compress.pipeline.bench import run_benchmark

    out = tmp_path_factory.mktemp("bench_out")
    res = run_benchmark(tiny_run, data_dir=DEMO_DATA, task="sst2", threads=1, batch_sizes=(1, 8), max_examples=24,
                        repeats=1, systems=SYSTEMS, isolation="inprocess", calibration_batches=2,
                        calibration_batch_size=16, out_dir=out, name="tiny", log=lambda m: None)
    return res, out


def test_models_found_from_meta(bench, tiny_run):
    res, _ = bench
    m = res["models"]
    assert m["teacher"].endswith("00-teacher/model") and m["hard"].endswith("02-hard/model")
    assert m["int8"].endswith("03-int8/model")


def test_fields_accuracy_and_ratios(bench):
    from ltp_compress.tasks.metrics import compute_metrics
    from ltp_compress.tasks.glue import get_task

    res, out = bench
    task = get_task("sst2")
    assert res["systems"] == SYSTEMS and res["data"]["examples"] == 24
    assert res["baseline"] == "hf_fp32_sdpa"
    hf = res["results"]["hf_fp32_sdpa"]
    assert hf["info"]["settings"]["attn_implementation"] == "sdpa"
    for s in SYSTEMS:
        r = res["results"][s]
        assert r["status"] == "ok", (s, r.get("error"), r.get("traceback"))
        preds = r["predictions"]
        assert len(preds) == 24 and all(p in (0, 1) for p in preds)
        # accuracy recomputed from the system's own predictions and the benchmarked labels
        from ltp_compress.tasks.data import DataConfig, load_split

        dev = load_split(DataConfig(source="glue_dir", path=str(DEMO_DATA), max_dev_examples=24), task, "dev")
        m = compute_metrics(task, preds, [e.label for e in dev.examples])
        assert r["metrics"]["main"] == pytest.approx(m["main"]) and r["accuracy"] == pytest.approx(m["accuracy"])
        runs = {x["batch_size"]: x for x in r["runs"]}
        assert set(runs) == {1, 8}
        for bs, x in runs.items():
            assert x["examples"] == 24 and x["examples_per_s"] > 0 and len(x["times_s"]) == 1
            ratio = r["ratios"][str(bs)]["vs_baseline"]
            hf_thr = next(y["examples_per_s"] for y in hf["runs"] if y["batch_size"] == bs)
            assert ratio == pytest.approx(x["examples_per_s"] / hf_thr)
            assert r["ratios"][str(bs)]["vs_best_int8_peer"] is None  # no peer ran
        assert r["latency_ms_p95"] >= r["latency_ms_p50"] > 0
    assert res["results"]["hf_fp32_sdpa"]["ratios"]["8"]["vs_baseline"] == pytest.approx(1.0)
    # INT8 vs its FP32 reference, from the two systems' own predictions
    gap = res["results"]["ltp_int8"]["accuracy_vs_fp32"]
    assert gap["reference"] == "ltp_fp32" and gap["gap_points"] == pytest.approx(
        100 * (res["results"]["ltp_int8"]["metrics"]["main"] - res["results"]["ltp_fp32"]["metrics"]["main"]))
    assert res["results"]["dense_int8"]["accuracy_vs_fp32"]["reference"] == "hf_fp32_sdpa"
    assert "outside the timed region" in res["tokenization"]
    # the real INT8 kernel ran for our INT8 systems
    for s in ("dense_int8", "ltp_int8"):
        kc = res["results"][s]["kernel_counters"]
        backend = res["results"][s]["info"]["backend"]
        kernel = KERNEL_COUNTER[backend]
        assert kc.get(kernel, 0) > 0 and set(kc) == {kernel}
    assert "kernel_counters" not in res["results"]["ltp_fp32"]
    prof = res["results"]["ltp_int8"]["profile"]
    assert prof["status"] == "ok" and prof["batch_size"] == 8 and prof["int8_linear_calls"] > 0
    assert prof["int8_gemm_macs"] > 0 and sum(prof["fraction_by_class"].values()) == pytest.approx(1.0)
    assert sum(prof["fraction_by_summary_class"].values()) == pytest.approx(1.0)
    assert prof["time_by_class_s"].get("int8_linear_gemm", 0) > 0 and prof["effective_gemm_gops"] > 0
    # what ours executed, counted from their own runtimes' kept tokens: dense runs every token
    assert res["results"]["dense_int8"]["cost"]["relative_flops_executed"] == pytest.approx(1.0)
    ltp_cost = res["results"]["ltp_int8"]["cost"]
    assert ltp_cost["examples"] == 24 and 0 < ltp_cost["relative_flops_executed"] <= ltp_cost["relative_flops_paper"] <= 1.0
    assert "cost" not in hf
    sp = res["pruning_speedup"]["torch"]
    assert sp["relative_flops_executed"] == pytest.approx(ltp_cost["relative_flops_executed"])
    for bs in ("1", "8"):
        thr = {s: next(y["examples_per_s"] for y in res["results"][s]["runs"] if y["batch_size"] == int(bs)) for s in ("dense_int8", "ltp_int8")}
        assert sp["by_batch_size"][bs]["speedup"] == pytest.approx(thr["ltp_int8"] / thr["dense_int8"])
        assert sp["by_batch_size"][bs]["realised_fraction"] == pytest.approx(sp["by_batch_size"][bs]["speedup"] / sp["flops_reduction"])
    assert res["pruning_speedup"]["onnxruntime"]["status"] == "not measured"  # dense_int8_ort / ltp_int8_ort not in this run
    # outputs
    saved = json.loads((out / "tiny.json").read_text())
    assert saved["results"]["ltp_int8"]["metrics"] == res["results"]["ltp_int8"]["metrics"]
    md = (out / "tiny.md").read_text()
    assert all(s in md for s in SYSTEMS) and "realised speedup vs FLOPs reduction" in md


def test_result_names_the_machine_that_made_it(bench):
    """One environment block (pipeline/environment.py) in the JSON, its one-line summary in the Markdown."""
    from ltp_compress.pipeline.environment import ENVIRONMENT_KEYS, environment_summary

    res, out = bench
    env = json.loads((out / "tiny.json").read_text())["environment"]
    assert set(ENVIRONMENT_KEYS) <= set(env) and env["threads"] == 1
    assert res["loadavg_before"] == env["loadavg_start"] and res["loadavg_after"] == env["loadavg_end"]
    assert environment_summary(env) in (out / "tiny.md").read_text()


def test_failed_system_is_recorded_not_dropped(tiny_run, tmp_path):
    from ltp_compress.pipeline.bench import render_markdown, run_benchmark

    int8 = tiny_run / "stages" / "03-int8" / "model"
    res = run_benchmark(int8, run_dir=None, teacher=tmp_path / "missing", data_dir=DEMO_DATA, task="sst2", threads=1,
                        batch_sizes=(8,), max_examples=8, repeats=1, systems=["hf_fp32_sdpa", "ltp_int8"],
                        isolation="inprocess", profile_bs=None, log=lambda m: None)
    assert res["results"]["hf_fp32_sdpa"]["status"] == "failed" and res["results"]["hf_fp32_sdpa"]["error"]
    assert res["results"]["ltp_int8"]["status"] == "ok"
    assert "failed:" in render_markdown(res)


def test_bench_cli_subprocess_isolation(tiny_run, tmp_path, capsys):
    """`ltp-compress bench` on the run's deployable checkpoint; the system runs in a spawn child (own peak RSS)."""
    from ltp_compress.pipeline.cli import main

    ckpt = tiny_run / "stages" / "03-int8" / "model"
    assert main(["bench", str(ckpt), "--data", str(DEMO_DATA), "--task", "sst2", "--out-dir", str(tmp_path), "--threads", "1",
                 "--batch-sizes", "8", "--max-examples", "8", "--repeats", "1", "--systems", "ltp_int8",
                 "--isolation", "subprocess", "--profile-bs", "0", "--name", "cli"]) == 0
    res = json.loads((tmp_path / "cli.json").read_text())
    r = res["results"]["ltp_int8"]
    assert r["status"] == "ok", r.get("error")
    assert res["models"]["teacher"].endswith("00-teacher/model")  # found from the checkpoint's run
    assert r["peak_rss_mb"] > 0 and "spawn child" in r["rss_method"]
    assert sum(r["kernel_counters"].values()) > 0
    assert "ltp_int8" in capsys.readouterr().out


@pytest.mark.parametrize("extra, why", [
    (["--batch-sizes", "a"], "expected comma-separated integers"),
    (["--batch-sizes", "0,8"], "batch sizes >= 1"),
])
def test_bench_bad_batch_sizes_are_usage_errors(tmp_path, capsys, extra, why):
    from ltp_compress.pipeline.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", str(tmp_path), "--data", str(DEMO_DATA), "--task", "sst2", "--out-dir", str(tmp_path / "o"), *extra])
    assert e.value.code == 2 and why in capsys.readouterr().err


def test_bench_refuses_bad_task_data_and_manifest_before_any_compute(tiny_run, tmp_path, capsys):
    """An unknown task, a missing data folder, a malformed manifest: exit 2 naming what is wrong, no result file."""
    import shutil

    from ltp_compress.pipeline.cli import main

    ckpt = next(p for p in sorted((tiny_run / "stages").glob("*/model")) if (p / "manifest.json").is_file())
    out = tmp_path / "o"
    base = ["--out-dir", str(out), "--threads", "1", "--systems", "ltp_int8"]
    assert main(["bench", str(ckpt), "--data", str(DEMO_DATA), "--task", "nosuch", *base]) == 2
    assert "--task: unknown task 'nosuch'" in capsys.readouterr().err
    assert main(["bench", str(ckpt), "--data", str(tmp_path / "nodata"), "--task", "sst2", *base]) == 2
    assert "nodata: not a folder" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "manifest.json").write_text('{"format": 1')
    for tok in broken.glob("tokenizer*"):
        tok.unlink()  # what it loads second is not reached: the manifest is read first
    assert main(["bench", str(broken), "--data", str(DEMO_DATA), "--task", "sst2", *base]) == 2
    assert "broken/manifest.json: unreadable or malformed manifest" in capsys.readouterr().err
    assert not out.exists()
