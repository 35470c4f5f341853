"""The benchmark's analysis of measured systems: throughput ratios vs the baseline and the best dense
INT8 peer, INT8-vs-FP32 accuracy gaps, the realised speedup of token pruning alone, and merging the
interleaved rounds of one system."""

from __future__ import annotations

import statistics

import numpy as np

from ltp_compress.pipeline.bench_args import BASELINE, DEFAULT_PRECISION_PEERS, FP32_PEERS, INT8_PEERS
from ltp_compress.pipeline.peers import REGISTRY

ACCURACY_GAP_POINTS = 1.0  # an INT8 system more than this many points from its FP32 reference is flagged


#: (dense system, pruned system, runtime): realised speedup of token pruning alone on that runtime (the registry's pruning_vs)
PRUNING_PAIRS = tuple((p.pruning_vs, name, p.runtime) for name, p in REGISTRY.items() if p.pruning_vs)


def add_pruning_speedup(results: dict[str, dict], batch_sizes) -> dict:
    """Per runtime and batch size: speedup of the pruned INT8 model over the dense INT8 model on the
    same runtime, and that speedup divided by the FLOPs reduction it ran at (executed convention,
    measured by the pruned system itself): 1.0 = every FLOP removed is time saved. Where the runtime
    runs the last layer on [CLS] only (the fused runtime, dense model included), also the speedup
    divided by the reduction of the FLOPs it runs (`realised_fraction_of_run_flops`): the executed
    convention charges the dense model's last layer on every token, time it never spends."""
    out = {}
    for dense, pruned, runtime in PRUNING_PAIRS:
        d, p = results.get(dense, {}), results.get(pruned, {})
        if d.get("status") != "ok" or p.get("status") != "ok" or "cost" not in p:
            out[runtime] = {"status": "not measured", "dense": dense, "pruned": pruned}
            continue
        rel = p["cost"]["relative_flops_executed"] / d["cost"]["relative_flops_executed"]
        row = {"dense": dense, "pruned": pruned, "relative_flops_executed": rel, "flops_reduction": 1.0 / rel, "by_batch_size": {}}
        run_rows = p["cost"].get("last_layer_rows", "all")
        rel_run = None
        if run_rows != "all" and "relative_flops_run" in p["cost"] and "relative_flops_run" in d["cost"]:
            rel_run = p["cost"]["relative_flops_run"] / d["cost"]["relative_flops_run"]
            row.update({"last_layer_rows": run_rows, "relative_flops_run": rel_run, "run_flops_reduction": 1.0 / rel_run})
        for bs in batch_sizes:
            td, tp = throughput(results, dense, bs), throughput(results, pruned, bs)
            if td and tp:
                row["by_batch_size"][str(bs)] = {"speedup": tp / td, "realised_fraction": (tp / td) * rel}
                if rel_run is not None:
                    row["by_batch_size"][str(bs)]["realised_fraction_of_run_flops"] = (tp / td) * rel_run
        out[runtime] = row
    return out


def same_prediction(a, b) -> bool:
    return a == b if isinstance(a, int) else abs(a - b) < 1e-4


def throughput(results: dict[str, dict], name: str, bs: int) -> float | None:
    """Examples/s of a successful system at batch size bs (None: failed, missing or not run at bs)."""
    r = results.get(name)
    if not r or r.get("status") != "ok":
        return None
    return next((x["examples_per_s"] for x in r["runs"] if x["batch_size"] == bs), None)


def add_ratios(results: dict[str, dict], batch_sizes) -> dict:
    """Per successful system and batch size: throughput ratio vs the baseline (HF FP32, sdpa) and vs
    the best successful dense INT8 peer (the fastest third-party INT8 system at that batch size)."""
    def thr(name, bs):
        return throughput(results, name, bs)

    best_peer = {}
    for bs in batch_sizes:
        cands = [(thr(p, bs), p) for p in INT8_PEERS if thr(p, bs)]
        best_peer[str(bs)] = {"system": max(cands)[1], "examples_per_s": max(cands)[0]} if cands else None
    for name, r in results.items():
        if r.get("status") != "ok":
            continue
        ratios = {}
        for bs in batch_sizes:
            t = thr(name, bs)
            base = thr(BASELINE, bs)
            bp = best_peer[str(bs)]
            ratios[str(bs)] = {"vs_baseline": (t / base) if (t and base) else None,
                               "vs_best_int8_peer": (t / bp["examples_per_s"]) if (t and bp) else None,
                               "best_int8_peer": bp["system"] if bp else None}
        r["ratios"] = ratios
    return best_peer


def add_best_dense_peer(results: dict[str, dict], batch_sizes) -> dict:
    """Per batch size, the best dense peer of any precision (the HF baseline, the FP32 peers, the
    default-precision peers such as bf16, the INT8 peers) whose accuracy is within
    ACCURACY_GAP_POINTS of its FP32 reference (a system without one is its own reference), and each
    successful system's throughput ratio to it (`ratios[bs]["vs_best_dense_peer"]`). Needs
    `add_accuracy_gaps` first. Returns {bs: {system, examples_per_s, main_points} | None}."""
    def eligible(name):
        gap = results[name].get("accuracy_vs_fp32")
        return REGISTRY[name].fp32_reference is None or (gap is not None and "gap_points" in gap and not gap["flag"])

    dense = [p for p in (BASELINE, *FP32_PEERS, *DEFAULT_PRECISION_PEERS, *INT8_PEERS) if p in results]
    best = {}
    for bs in batch_sizes:
        cands = [(throughput(results, p, bs), p) for p in dense if throughput(results, p, bs) and eligible(p)]
        best[str(bs)] = ({"system": max(cands)[1], "examples_per_s": max(cands)[0],
                          "main_points": 100.0 * results[max(cands)[1]]["metrics"]["main"]} if cands else None)
    for name, r in results.items():
        if r.get("status") == "ok":
            for bs in batch_sizes:
                t, bp = throughput(results, name, bs), best[str(bs)]
                r["ratios"][str(bs)].update(vs_best_dense_peer=(t / bp["examples_per_s"]) if (t and bp) else None,
                                            best_dense_peer=bp["system"] if bp else None)
    return best


def add_accuracy_gaps(results: dict[str, dict]) -> None:
    """Each successful system with an FP32 reference (peers: INT8 vs its own FP32; ours: INT8 vs the
    FP model it was quantised from; ORT runs of ours vs the torch run): the main-metric gap in
    points, flagged when above ACCURACY_GAP_POINTS."""
    for name, r in results.items():
        ref = REGISTRY[name].fp32_reference if name in REGISTRY else None
        if r.get("status") != "ok" or ref is None:
            continue
        rr = results.get(ref)
        if not rr or rr.get("status") != "ok":
            r["accuracy_vs_fp32"] = {"reference": ref, "status": "reference not run or failed: gap unverified"}
            continue
        gap = 100.0 * (r["metrics"]["main"] - rr["metrics"]["main"])
        agree = float(np.mean([same_prediction(a, b) for a, b in zip(r["predictions"], rr["predictions"])]))
        r["accuracy_vs_fp32"] = {"reference": ref, "main_points": 100.0 * r["metrics"]["main"],
                                 "reference_main_points": 100.0 * rr["metrics"]["main"], "gap_points": gap,
                                 "prediction_agreement": agree, "flag": abs(gap) > ACCURACY_GAP_POINTS,
                                 "limit_points": ACCURACY_GAP_POINTS}


def merge_rounds(rounds: list[dict]) -> dict:
    """One system's results of several interleaved rounds -> one result: the first successful
    round's record, its per-batch-size throughput and bs-1 latencies replaced by the median over
    the successful rounds (each round's value kept)."""
    ok = [r for r in rounds if r.get("status") == "ok"]
    if not ok:
        out = dict(rounds[0])
        out["rounds"] = [{"status": r.get("status"), "error": r.get("error")} for r in rounds]
        return out
    out = dict(ok[0])
    if len(rounds) == 1:
        out["rounds_ok"] = 1
        return out
    runs = []
    for x in ok[0]["runs"]:
        bs = x["batch_size"]
        per = [next(y for y in r["runs"] if y["batch_size"] == bs) for r in ok]
        m = dict(x)
        m["rounds_examples_per_s"] = [y["examples_per_s"] for y in per]
        m["examples_per_s"] = float(statistics.median(m["rounds_examples_per_s"]))
        m["warmup_s"] = [y["warmup_s"] for y in per]
        for k in ("latency_ms_p50", "latency_ms_p95"):
            if k in x:
                m[f"rounds_{k}"] = [y[k] for y in per]
                m[k] = float(statistics.median(m[f"rounds_{k}"]))
        runs.append(m)
    out["runs"] = runs
    bs1 = next((r for r in runs if r["batch_size"] == 1), None)
    if bs1:
        out["latency_ms_p50"], out["latency_ms_p95"] = bs1.get("latency_ms_p50"), bs1.get("latency_ms_p95")
    out["rounds_ok"] = len(ok)
    out["rounds_failed"] = [r.get("error") for r in rounds if r.get("status") != "ok"]
    out["predictions_stable_across_rounds"] = all(r["predictions"] == ok[0]["predictions"] for r in ok)
    out["setup_s"] = [r.get("setup_s") for r in ok]
    return out
