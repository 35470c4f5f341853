"""Measuring one benchmarked system: build it, time every batch size (warmup pass, then the median of
`repeats` timed passes; bs-1 latency percentiles), score its predictions, profile one batch, count
the FLOPs it executed; in isolation by default (`run_system`: a fresh *spawn* child per system, so
its peak RSS is its own), or in this process."""

from __future__ import annotations

import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from ltp_compress.pipeline.bench_analysis import same_prediction
from ltp_compress.pipeline.bench_inputs import BenchInputs
from ltp_compress.pipeline.peers import REGISTRY, check_fast_ops
from ltp_compress.pipeline.peers import build as build_system
from ltp_compress.pipeline.peers.common import System

NEEDS = {name: peer.needs for name, peer in REGISTRY.items()}  # which model each system is built from
DESCRIPTIONS = {name: peer.description for name, peer in REGISTRY.items()}


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / (1024.0 * 1024.0)


def _observed_int8_ops(system: System, batch) -> list[str]:
    """Names of int8 / quantized ops seen by the torch profiler on one batch (torch systems)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    keys = ("qlinear", "_int_mm", "quantized", "int8", "dynamic_quant", "qgemm", "onednn")
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        system.logits(batch)
    return sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)})


def measure_system(name: str, inp: BenchInputs) -> dict:
    """Build one system and measure it (in the current process)."""
    import torch

    from ltp_compress.tasks.glue import get_task

    torch.set_num_threads(inp.threads)
    task = get_task(inp.task)
    res: dict = {"system": name, "description": DESCRIPTIONS.get(name, ""), "status": "ok",
                 "built_from": {"role": NEEDS[name], "path": inp.models.get(NEEDS[name])}}  # see the result's "checkpoints"
    rss0 = _rss_mb()
    import torch._inductor.config as inductor_config

    saved_inductor = inductor_config.get_config_copy()  # compiled systems change it; restored below
    try:
        return _measure(name, inp, task, res, rss0)
    finally:
        inductor_config.load_config(saved_inductor)


def _timed_pass(system: System, batches, bs: int, lat: list) -> float:
    t1 = time.perf_counter()
    if bs == 1:
        for b in batches:
            s = time.perf_counter()
            system.logits(b)
            lat.append(time.perf_counter() - s)
    elif system.run_pass is not None:
        system.run_pass(batches)
    else:
        for b in batches:
            system.logits(b)
    return time.perf_counter() - t1


def _measure(name: str, inp: BenchInputs, task, res: dict, rss0: float) -> dict:
    import torch

    from ltp_compress.kernels import kernel_counters
    from ltp_compress.stages.common import predictions_from_logits

    t0 = time.perf_counter()
    system = build_system(name, inp)
    res["setup_s"] = time.perf_counter() - t0
    model = system.info.pop("_model", None)
    res["info"] = system.info
    counters0 = kernel_counters()
    runs = []
    preds_by_bs: dict[int, list] = {}
    with torch.inference_mode():
        for bs in sorted(inp.batches):
            batches = inp.batches[bs]
            n = sum(len(b) for b in batches)
            preds: list = [None] * len(inp.labels)
            tw = time.perf_counter()
            # warmup pass (compilation for compiled systems), predictions
            outs = system.run_pass(batches) if (bs > 1 and system.run_pass is not None) else [system.logits(b) for b in batches]
            for b, out in zip(batches, outs):
                out = torch.as_tensor(out)
                for j, p in zip(b.index.tolist(), predictions_from_logits(out, task.num_labels).tolist()):
                    preds[j] = p
            warmup_s = time.perf_counter() - tw
            preds_by_bs[bs] = preds
            lat: list = []
            times = [_timed_pass(system, batches, bs, lat) for _ in range(max(1, inp.repeats))]
            med = statistics.median(times)
            r = {"batch_size": bs, "examples": n, "batches": len(batches), "warmup_s": warmup_s,
                 "times_s": times, "median_s": med, "examples_per_s": n / med if med > 0 else float("inf")}
            if bs > 1 and system.run_pass is not None:
                r["pass"] = "run_pass (the runtime's own way to run many requests, see info.settings)"
            if bs == 1 and lat:
                r["latency_ms_p50"] = 1e3 * float(np.percentile(lat, 50))
                r["latency_ms_p95"] = 1e3 * float(np.percentile(lat, 95))
            runs.append(r)
    counters1 = kernel_counters()
    delta = {k: counters1.get(k, 0) - counters0.get(k, 0) for k in counters1 if counters1.get(k, 0) != counters0.get(k, 0)}
    if REGISTRY[name].kernel_counters:
        res["kernel_counters"] = delta  # kernel_counters() deltas over the warmup + timed passes of every batch size
        res["kernel_counters_passes"] = len(inp.batches) * (1 + max(1, inp.repeats))
    res["runs"] = runs
    main_bs = max(preds_by_bs)
    preds = preds_by_bs[main_bs]
    res["predictions_batch_size"] = main_bs
    res["predictions"] = preds
    from ltp_compress.tasks.metrics import compute_metrics

    res["metrics"] = {k: float(v) for k, v in compute_metrics(task, preds, inp.labels).items()}
    res["accuracy"] = res["metrics"].get("accuracy")  # None for regression (STS-B)
    agree = {}
    for bs, p in preds_by_bs.items():
        if bs != main_bs:
            agree[str(bs)] = float(np.mean([same_prediction(a, b) for a, b in zip(p, preds)])) if preds else 1.0
    res["prediction_agreement_vs_main_bs"] = agree
    bs1 = next((r for r in runs if r["batch_size"] == 1), None)
    if bs1:
        res["latency_ms_p50"], res["latency_ms_p95"] = bs1.get("latency_ms_p50"), bs1.get("latency_ms_p95")
    if system.kept_tokens is not None:
        res["cost"] = executed_cost(system, inp.batches[main_bs], inp.models[NEEDS[name]])
    probe = inp.batches[main_bs][0]
    ops: list = []
    if system.op_profile is not None:  # the runtime's own profile (ORT, OpenVINO)
        try:
            res["runtime_profile"] = system.op_profile(probe)
            ops = list(res["runtime_profile"].get("op_counts_per_run") or res["runtime_profile"].get("runtime_layers") or [])
        except Exception as e:
            res["runtime_profile"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    else:
        try:
            ops = res["int8_ops_observed"] = _observed_int8_ops(system, probe)
        except Exception as e:  # diagnostics only
            res["int8_ops_observed"] = f"profiler failed: {type(e).__name__}: {e}"
    if REGISTRY[name].fast_ops:
        res["fast_ops"] = check_fast_ops(name, ops)
    if REGISTRY[name].op_class_profile and inp.profile_bs:
        from ltp_compress.pipeline.bench_profile import profile_int8

        pbs = inp.profile_bs if inp.profile_bs in inp.batches else max(inp.batches)
        try:
            res["profile"] = profile_int8(system, model, inp.batches[pbs], pbs, inp)
        except Exception as e:
            res["profile"] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    res["rss_before_build_mb"] = rss0
    res["rss_after_mb"] = _rss_mb()
    res["peak_rss_mb_process"] = _maxrss_mb()
    return res


def executed_cost(system: System, batches, model_dir) -> dict:
    """Relative FLOPs (both conventions) of what `system` executes on these batches, from the
    tokens its own runtime reports entering each layer (not from the run's report)."""
    from transformers import AutoConfig

    from ltp_compress.modeling.accounting import EncoderShape, relative_flops

    kept = np.concatenate([np.asarray(system.kept_tokens(b)) for b in batches])  # [N, L]
    lengths = np.concatenate([b.attention_mask.sum(1).numpy() for b in batches])  # [N]
    shape = EncoderShape.from_config(AutoConfig.from_pretrained(str(model_dir)))  # the checkpoint the system was built from
    return {"relative_flops_executed": relative_flops(kept, lengths, shape, "executed"),
            "relative_flops_paper": relative_flops(kept, lengths, shape, "paper"),
            # the executed count with the last layer as this runtime runs it (the fused runtime: [CLS] only)
            "last_layer_rows": system.last_layer_rows,
            "relative_flops_run": relative_flops(kept, lengths, shape, "executed", system.last_layer_rows),
            "mean_tokens_per_layer": kept.mean(0).tolist(), "examples": int(len(lengths))}


def _child(name: str, inp: BenchInputs, conn) -> None:
    try:
        res = measure_system(name, inp)
        res["peak_rss_mb"] = res.pop("peak_rss_mb_process")
        res["rss_method"] = "ru_maxrss of a fresh spawn child running only this system (includes interpreter, torch, inputs)"
        conn.send(res)
    except BaseException as e:  # report, never crash the parent
        conn.send({"system": name, "status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-4000:], "peak_rss_mb": _maxrss_mb()})
    finally:
        conn.close()


def run_system(name: str, inp: BenchInputs, isolation: str = "subprocess", timeout_s: float = 3600.0) -> dict:
    """Measure one system; never raises (a failure becomes {"status": "failed", "error": ...})."""
    if isolation == "inprocess":
        try:
            res = measure_system(name, inp)
            res["peak_rss_mb"] = None
            res["rss_growth_mb"] = res["rss_after_mb"] - res["rss_before_build_mb"]
            res.pop("peak_rss_mb_process", None)
            res["rss_method"] = "in-process: VmRSS growth while building and running this system (current RSS, not a peak)"
            return res
        except Exception as e:
            return {"system": name, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, inp, child), name=f"bench-{name}")
    proc.start()
    child.close()
    res = None
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if parent.poll(1.0):
                try:
                    res = parent.recv()
                except EOFError:
                    res = None
                break
            if not proc.is_alive() and not parent.poll(0.1):
                break
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if res is None:
        why = f"timed out after {timeout_s:.0f} s" if time.time() >= deadline else f"child process exited with code {proc.exitcode} without a result"
        return {"system": name, "status": "failed", "error": why}
    return res
