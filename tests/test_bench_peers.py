"""The deployment peers of the end-to-end benchmark (pipeline/peers/) on the tiny run: ONNX Runtime
FP32 / INT8 dynamic / INT8 static, OpenVINO FP32 / INT8 (NNCF), ours on ONNX Runtime. Each runs (or
is recorded failed, naming the missing package), records its settings and doc links, shows its fast
ops in its runtime's own profile (integer GEMMs for every INT8 system: a float fallback fails the
check, see the negative controls), and is compared with its FP32 reference."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import DEMO_DATA, REPO
from test_bench import tiny_run  # noqa: F401 (module fixture: the tiny run directory)

ORT = ["ort_fp32", "ort_int8_dynamic", "ort_int8_static"]
OV = ["openvino_fp32", "openvino_default", "openvino_int8"]
OURS_ORT = ["ltp_int8_ort", "dense_int8_ort"]
FUSED = ["dense_int8_fused", "ltp_int8_fused"]
SYSTEMS = [*ORT, *OV, "hf_bf16_sdpa", "ltp_int8", *OURS_ORT, *FUSED]  # the HF baseline and dense_int8 (torch): tests/test_bench.py
INT8 = ["ort_int8_dynamic", "ort_int8_static", "openvino_int8", *OURS_ORT]


def _fused_unavailable() -> str | None:
    from ltp_compress.kernels import fused_encoder

    return fused_encoder.available()


def _have(*mods) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in mods)


@pytest.fixture(scope="module")
def peers(tiny_run, tmp_path_factory):  # noqa: F811
    from ltp_compress.pipeline.bench import run_benchmark

    out = tmp_path_factory.mktemp("peers_out")
    work = tmp_path_factory.mktemp("peers_work")
    res = run_benchmark(tiny_run, data_dir=DEMO_DATA, task="sst2", threads=1, batch_sizes=(1, 8), max_examples=16,
                        repeats=1, systems=SYSTEMS, isolation="inprocess", calibration_batches=1,
                        calibration_batch_size=16, profile_bs=None, work_dir=work, out_dir=out, name="peers",
                        log=lambda m: None)
    return res, out, work


def test_registry_covers_every_system_name():
    from ltp_compress.pipeline.bench_args import FP32_PEERS, INT8_PEERS, OURS, SYSTEMS as ALL
    from ltp_compress.pipeline.peers import REGISTRY

    assert set(REGISTRY) == set(ALL) and len(ALL) == len(set(ALL))
    for name in INT8_PEERS:  # every dense INT8 peer: an FP32 reference and integer ops to find in its profile
        peer = REGISTRY[name]
        assert peer.fp32_reference in FP32_PEERS + ("hf_fp32_sdpa",) and peer.fast_ops, name
    for name, peer in REGISTRY.items():
        assert peer.fp32_reference is None or peer.fp32_reference in ALL
    assert {"ltp_int8_ort", "dense_int8_ort"} <= set(OURS)


def test_every_peer_runs_with_settings_profile_and_predictions(peers):
    res, out, work = peers
    for s in SYSTEMS:
        r = res["results"][s]
        pkgs = {"ort": ("onnxruntime", "onnx"), "ope": ("openvino", "nncf")}.get(s[:3], ())
        if r["status"] != "ok" and pkgs and not _have(*pkgs):
            assert "not installed" in r["error"], r["error"]  # recorded, not dropped
            continue
        if s in FUSED and _fused_unavailable():
            assert r["status"] != "ok" and "not available here" in r["error"], r  # the reason, not a silent fallback
            continue
        assert r["status"] == "ok", (s, r.get("error"), r.get("traceback"))
        assert len(r["predictions"]) == 16 and all(p in (0, 1) for p in r["predictions"])
        assert {x["batch_size"] for x in r["runs"]} == {1, 8}
        assert r["latency_ms_p95"] >= r["latency_ms_p50"] > 0
        assert r["info"].get("settings"), s
    for s in ORT + OV + OURS_ORT:
        r = res["results"][s]
        if r["status"] != "ok":
            continue
        assert r["info"]["docs"] and all(d.startswith("https://") for d in r["info"]["docs"]), s
        assert r["fast_ops"]["confirmed"] is True, (s, r["fast_ops"], r.get("runtime_profile"))
        prof = r["runtime_profile"]
        counts = prof.get("op_counts_per_run") or prof.get("runtime_layers")
        assert counts and all(v > 0 for v in counts.values()), s
    saved = json.loads((out / "peers.json").read_text())  # everything above is in the written JSON
    assert saved["results"]["ort_fp32"]["info"]["settings"] == res["results"]["ort_fp32"]["info"]["settings"]
    md = (out / "peers.md").read_text()
    assert all(s in md for s in SYSTEMS) and "settings:" in md


@pytest.mark.skipif(not _have("onnxruntime", "onnx"), reason="onnxruntime not installed")
def test_ort_peers_configuration(peers):
    res, _, work = peers
    r = res["results"]
    for s in ORT + OURS_ORT:
        so = r[s]["info"]["session_options"]
        assert so["intra_op_num_threads"] == 1 and so["inter_op_num_threads"] == 1 and so["graph_optimization_level"] == "ORT_ENABLE_ALL"
        # larger batches: concurrent requests on a one-thread session, as every ORT system runs them
        assert "called from `threads` threads at once" in r[s]["info"]["settings"]["batch_size_gt_1"], s
        assert any(x.get("pass", "").startswith("run_pass") for x in r[s]["runs"] if x["batch_size"] == 8), s
    opt = r["ort_fp32"]["info"]["settings"]
    assert opt["optimizer"]["model_type"] == "bert" and opt["optimizer"]["num_heads"] > 0
    assert opt["fused_operator_statistics"].get("Attention", 0) == 2  # both layers fused
    prof = r["ort_fp32"]["runtime_profile"]["op_counts_per_run"]
    assert prof["Attention"] == 2 and prof["SkipLayerNormalization"] == 4 and not r["ort_fp32"]["runtime_profile"]["integer_ops"]
    assert r["ort_int8_dynamic"]["info"]["settings"]["quantize_dynamic"] == {
        "weight_type": "QInt8", "per_channel": True, "reduce_range": False, "op_types_to_quantize": "all supported"}
    st = r["ort_int8_static"]["info"]["settings"]["quantize_static"]
    assert st["quant_format"] == "QDQ" and st["per_channel"] and st["calibrate_method"] == "MinMax"
    for s in INT8:
        if s.startswith("openvino"):
            continue
        assert r[s]["runtime_profile"]["integer_ops"], s  # integer GEMM kernels ran
    # the artifacts the peers ran, with their sha256 (the work folder is kept when given)
    for s, f in (("ort_fp32", "teacher_fp32_opt.onnx"), ("ort_int8_dynamic", "teacher_int8_dynamic.onnx")):
        art = r[s]["info"]["artifacts"][f]
        from ltp_compress.manifest import sha256_file as sha256_of

        assert Path(art["path"]) == work / f and art["sha256"] == sha256_of(work / f)
    assert r["ltp_int8_ort"]["info"]["export_parity"]["argmax_agreement"] >= 0.9
    assert r["ltp_int8_ort"]["accuracy_vs_fp32"]["reference"] == "ltp_int8"
    cls = r["ltp_int8_ort"]["runtime_profile"]["time_fraction_by_class"]  # op-class profile of ours on ORT
    assert sum(cls.values()) == pytest.approx(1.0) and cls["int8_linear"] > 0
    assert r["ort_int8_dynamic"]["accuracy_vs_fp32"]["reference"] == "ort_fp32"
    # the exported graph's own kept_tokens output gives the same executed FLOPs as the torch runtime
    if r["ltp_int8"]["status"] == "ok":
        assert r["ltp_int8_ort"]["cost"]["relative_flops_executed"] == pytest.approx(r["ltp_int8"]["cost"]["relative_flops_executed"], abs=0.02)
    assert r["dense_int8_ort"]["cost"]["relative_flops_executed"] == pytest.approx(1.0)
    sp = res["pruning_speedup"]["onnxruntime"]
    assert sp["pruned"] == "ltp_int8_ort" and sp["relative_flops_executed"] == pytest.approx(r["ltp_int8_ort"]["cost"]["relative_flops_executed"])


def test_fused_pruning_speedup_counts_the_flops_the_runtime_runs(peers):
    """The fused runtime runs the last layer on [CLS] only, dense model included: its cost says so and
    the pruning-speedup row divides by the reduction of the FLOPs it runs as well as the executed one."""
    res, _, _ = peers
    r = res["results"]
    if _fused_unavailable():
        pytest.skip(f"fused runtime unavailable: {_fused_unavailable()}")
    p, d = r["ltp_int8_fused"]["cost"], r["dense_int8_fused"]["cost"]
    assert p["last_layer_rows"] == d["last_layer_rows"] == "cls"
    assert d["relative_flops_run"] == pytest.approx(1.0) and d["relative_flops_executed"] == pytest.approx(1.0)
    # the dense last layer it never runs is not saved by pruning (equal when the tiny run prunes nothing)
    assert p["relative_flops_run"] >= p["relative_flops_executed"]
    sp = res["pruning_speedup"]["fused"]
    assert sp["relative_flops_run"] == pytest.approx(p["relative_flops_run"]) and sp["last_layer_rows"] == "cls"
    for bs, row in sp["by_batch_size"].items():
        assert row["realised_fraction_of_run_flops"] == pytest.approx(row["speedup"] * sp["relative_flops_run"])
        assert row["realised_fraction_of_run_flops"] >= row["realised_fraction"]
    if r["ltp_int8_ort"]["status"] == "ok":
        assert r["ltp_int8_ort"]["cost"]["last_layer_rows"] == "all"
        assert "relative_flops_run" not in res["pruning_speedup"]["onnxruntime"]


@pytest.mark.skipif(not _have("openvino", "nncf"), reason="openvino / nncf not installed")
def test_openvino_peers_configuration(peers):
    res, _, _ = peers
    fp, q = res["results"]["openvino_fp32"], res["results"]["openvino_int8"]
    for r in (fp, q):
        st = r["info"]["settings"]
        assert st["batch_size_1"]["compiled"]["PERFORMANCE_HINT"] == "LATENCY"
        assert st["batch_size_gt_1"]["compiled"]["PERFORMANCE_HINT"] == "THROUGHPUT"
        assert st["batch_size_1"]["compiled"]["INFERENCE_NUM_THREADS"] == "1"
        assert r["info"]["default_inference_precision"]  # what OpenVINO would use unasked (bf16 on AMX/AVX512-BF16 CPUs)
        assert any(x.get("pass", "").startswith("run_pass") for x in r["runs"] if x["batch_size"] == 8)
    assert "float32" in fp["info"]["settings"]["batch_size_1"]["compiled"]["INFERENCE_PRECISION_HINT"]
    assert q["info"]["settings"]["nncf_quantize"]["model_type"] == "TRANSFORMER"
    layers = q["runtime_profile"]["runtime_layers"]
    assert sum(v for k, v in layers.items() if k.split("/")[0] == "FullyConnected" and k.split("/")[1] in ("u8", "i8")) > 0
    assert not any(k.startswith("FullyConnected/") and k.split("/")[1] in ("u8", "i8") for k in fp["runtime_profile"]["runtime_layers"])
    assert q["accuracy_vs_fp32"]["reference"] == "openvino_fp32" and "gap_points" in q["accuracy_vs_fp32"]


def test_float_profile_fails_the_int8_check(peers):
    """Negative control: the FP32 systems' own profiles do not pass their INT8 partners' check."""
    from ltp_compress.pipeline.peers import check_fast_ops

    res, _, _ = peers
    pairs = [("ort_fp32", "ort_int8_dynamic"), ("ort_fp32", "ort_int8_static"), ("openvino_fp32", "openvino_int8")]
    ran = 0
    for fp, q in pairs:
        r = res["results"][fp]
        if r["status"] != "ok":
            continue
        prof = r["runtime_profile"]
        ops = list(prof.get("op_counts_per_run") or prof.get("runtime_layers"))
        assert check_fast_ops(q, ops)["confirmed"] is False and check_fast_ops(fp, ops)["confirmed"] is True
        ran += 1
    assert check_fast_ops("ltp_int8_ort", ["MatMul", "Gemm", "Attention"])["confirmed"] is False
    assert ran or not _have("onnxruntime")


def test_checkpoints_named_by_recipe_and_sha256(peers, tiny_run):  # noqa: F811
    from ltp_compress.manifest import sha256_file as sha256_of

    res, _, _ = peers
    for role, stage in (("teacher", "00-teacher"), ("int8", "03-int8")):
        ident = res["checkpoints"][role]
        assert ident["recipe"] == "bench" and ident["stage"] == stage
        f = tiny_run / "stages" / stage / "model" / "model.safetensors"
        assert ident["files"]["model.safetensors"] == sha256_of(f)
    assert res["results"]["ltp_int8_ort"]["built_from"] == {"role": "int8", "path": res["models"]["int8"]}
    assert res["results"]["openvino_int8"]["built_from"]["role"] == "teacher"
    exp = res["results"]["ltp_int8_ort"]["info"]
    if res["results"]["ltp_int8_ort"]["status"] == "ok":
        assert exp["onnx_sha256"] == exp["export"]["files"]["model.onnx"]


def test_missing_package_is_recorded_failed(tiny_run, monkeypatch):  # noqa: F811
    import importlib.util

    from ltp_compress.pipeline.bench import render_markdown, run_benchmark

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "nncf" else real(name, *a, **k))
    res = run_benchmark(tiny_run, data_dir=DEMO_DATA, task="sst2", threads=1, batch_sizes=(8,), max_examples=8, repeats=1,
                        systems=["openvino_int8"], isolation="inprocess", calibration_batches=1, calibration_batch_size=8,
                        profile_bs=None, log=lambda m: None)
    r = res["results"]["openvino_int8"]
    assert r["status"] == "failed" and "nncf" in r["error"] and "not installed" in r["error"]
    assert "failed:" in render_markdown(res)


def test_cli_rounds_and_work_dir(tiny_run, tmp_path):  # noqa: F811
    """`ltp-compress bench` with an ONNX Runtime peer and ours on ONNX Runtime, 2 interleaved rounds, kept artifacts."""
    from ltp_compress.pipeline.cli import main

    pytest.importorskip("onnxruntime")
    work = tmp_path / "work"
    assert main(["bench", str(tiny_run), "--data", str(DEMO_DATA), "--task", "sst2", "--out-dir", str(tmp_path), "--threads", "1",
                 "--batch-sizes", "1,8", "--max-examples", "8", "--repeats", "1", "--rounds", "2",
                 "--systems", "ort_int8_dynamic,ltp_int8_ort", "--isolation", "inprocess", "--profile-bs", "0",
                 "--work-dir", str(work), "--calibration-batches", "1", "--name", "cli"]) == 0
    res = json.loads((tmp_path / "cli.json").read_text())
    assert res["rounds"] == 2 and res["work_dir"] == str(work)
    for s in ("ort_int8_dynamic", "ltp_int8_ort"):
        r = res["results"][s]
        assert r["status"] == "ok" and r["rounds_ok"] == 2 and r["predictions_stable_across_rounds"] is True
        for x in r["runs"]:
            assert len(x["rounds_examples_per_s"]) == 2
            assert x["examples_per_s"] == pytest.approx(sorted(x["rounds_examples_per_s"])[0] / 2 + sorted(x["rounds_examples_per_s"])[1] / 2)
    assert (work / "teacher_int8_dynamic.onnx").is_file() and (work / "ltp_int8_onnx" / "model.onnx").is_file()
    assert len(res["results"]["ort_int8_dynamic"]["setup_s"]) == 2  # built in each round (round 2 from round 1's files)


def test_accuracy_gap_flag_and_round_merge():
    from ltp_compress.pipeline.bench import add_accuracy_gaps, merge_rounds

    def ok(main, preds, eps):
        return {"status": "ok", "metrics": {"main": main}, "predictions": preds,
                "runs": [{"batch_size": 1, "examples_per_s": eps, "warmup_s": 0.1, "latency_ms_p50": 1.0 / eps,
                          "latency_ms_p95": 2.0 / eps}]}

    results = {"ort_fp32": ok(0.90, [1, 1, 0, 0], 10.0), "ort_int8_dynamic": ok(0.885, [1, 1, 0, 1], 20.0),
               "ort_int8_static": ok(0.895, [1, 1, 0, 0], 20.0), "openvino_int8": ok(0.9, [1, 1, 1, 1], 1.0)}
    add_accuracy_gaps(results)
    assert results["ort_int8_dynamic"]["accuracy_vs_fp32"]["flag"] is True  # 1.5 points
    assert results["ort_int8_dynamic"]["accuracy_vs_fp32"]["prediction_agreement"] == 0.75
    assert results["ort_int8_static"]["accuracy_vs_fp32"]["flag"] is False
    assert "unverified" in results["openvino_int8"]["accuracy_vs_fp32"]["status"]  # its FP32 did not run
    m = merge_rounds([ok(0.9, [1], 10.0), {"status": "failed", "error": "boom"}, ok(0.9, [1], 30.0), ok(0.9, [1], 20.0)])
    assert m["runs"][0]["examples_per_s"] == 20.0 and m["runs"][0]["rounds_examples_per_s"] == [10.0, 30.0, 20.0]
    assert m["rounds_ok"] == 3 and m["rounds_failed"] == ["boom"] and m["predictions_stable_across_rounds"]
    assert merge_rounds([{"status": "failed", "error": "x"}])["status"] == "failed"


def test_best_dense_peer_is_the_fastest_of_any_precision_within_a_point_of_its_fp32():
    """A bf16 peer 1.5 points below its FP32 reference is fast but not eligible; an INT8 peer within a
    point is; FP32 systems are their own reference; our systems are never a peer but get the ratio."""
    from ltp_compress.pipeline.bench import add_accuracy_gaps, add_best_dense_peer, add_ratios

    def ok(main, eps):
        return {"status": "ok", "metrics": {"main": main}, "predictions": [1, 0],
                "runs": [{"batch_size": 1, "examples_per_s": eps, "warmup_s": 0.1}]}

    results = {"hf_fp32_sdpa": ok(0.90, 10.0), "ort_fp32": ok(0.90, 30.0), "hf_bf16_sdpa": ok(0.885, 90.0),
               "ort_int8_dynamic": ok(0.895, 60.0), "ltp_int8_ort": ok(0.89, 240.0)}
    add_ratios(results, [1])
    add_accuracy_gaps(results)
    best = add_best_dense_peer(results, [1])
    assert best["1"]["system"] == "ort_int8_dynamic" and best["1"]["examples_per_s"] == 60.0
    assert results["ltp_int8_ort"]["ratios"]["1"]["vs_best_dense_peer"] == pytest.approx(4.0)
    results["ort_int8_dynamic"]["metrics"]["main"] = 0.88  # 2 points below ort_fp32: out, ort_fp32 is next
    add_accuracy_gaps(results)
    assert add_best_dense_peer(results, [1])["1"]["system"] == "ort_fp32"


def test_peer_modules_import_downwards_only():
    """pipeline/peers/ is part of the pipeline layer and below pipeline/bench*.py (which uses it)."""
    bad = []
    for path in sorted((REPO / "pipeline" / "peers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                if n == "ltp_compress" or n.startswith("ltp_compress.pipeline.bench"):
                    bad.append(f"{path.name}:{node.lineno} imports {n}")
    assert not bad, bad
    assert len(list((REPO / "pipeline" / "peers").glob("*.py"))) >= 6
