"""End-to-end inference benchmark: our pruned / INT8 runtimes vs what users deploy.

The systems are built by `pipeline/peers/` (one module per family; names and groups in
`pipeline/bench_args.py`, which also holds the command line shared by `ltp-compress bench` and
benchmarks/e2e_bench.py). This module measures them: every system runs on the SAME tokenised dev
examples, cut into the SAME length-bucketed, dynamically padded batches (each batch padded to its
own longest row; `length_bucketed_batches` with shuffle off), with ``torch.set_num_threads(threads)``
and each runtime's own thread setting = threads. Tokenisation happens once, before any system is
built: it is outside every timed region.

Per system: accuracy (task metrics via ``compute_metrics``) on the benchmarked examples, throughput
(examples/s, median of ``repeats`` timed passes after one warmup pass, then the median over
``rounds`` interleaved rounds) per batch size, bs-1 latency p50/p95, peak RSS, setup (load /
quantise / export) and warmup (incl. compilation) time, its settings and doc links (``info``), its
runtime's profile of one batch (ORT / OpenVINO op types, or the torch profiler's int8 ops) and
whether that profile shows the system's fast ops (``fast_ops``), its INT8-vs-FP32 accuracy gap
(``accuracy_vs_fp32``, flagged above 1 point), and throughput ratios vs the baseline (HF FP32,
sdpa) and vs the best dense INT8 peer (the fastest third-party INT8 system at that batch size).
A failing system is recorded with its error, never dropped. ``ltp_int8`` also gets an op-class
profile (`bench_profile.profile_int8`); every benchmarked checkpoint is named by recipe and sha256.

Isolation: by default each system runs in its own ``multiprocessing`` *spawn* child (fresh
interpreter, the same pickled batches), so its peak RSS (``ru_maxrss``) is its own;
``isolation="inprocess"`` runs everything in this process and reports VmRSS growth instead.
Rounds: with ``rounds`` > 1 the whole list of systems runs again (fresh children, same order),
so slow drifts of a shared machine hit every system alike.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ltp_compress.manifest import MANIFEST_FILE
from ltp_compress.modeling.checkpoint_format import read_deployable_info
from ltp_compress.pipeline.bench_args import BASELINE, FP32_PEERS, INT8_PEERS, OURS, SYSTEMS  # noqa: F401 (re-exported)
from ltp_compress.pipeline.peers import REGISTRY, check_fast_ops
from ltp_compress.pipeline.peers import build as build_system  # noqa: F401 (re-exported)
from ltp_compress.pipeline.peers.common import BenchError, System, checkpoint_identity, version
from ltp_compress.pipeline.run_dir import RunDir

NEEDS = {name: peer.needs for name, peer in REGISTRY.items()}  # which model each system is built from
DESCRIPTIONS = {name: peer.description for name, peer in REGISTRY.items()}
ACCURACY_GAP_POINTS = 1.0  # an INT8 system more than this many points from its FP32 reference is flagged
PRUNED_FP_STAGES = ("ltp_hard", "distill")  # stages whose model is a hard-pruned FP model (ltp_fp32 can run it)
TOKENIZATION = ("outside the timed region: the dev set is tokenised once, before any system is built, and every "
                "system receives the same pre-tokenised, pre-padded int64 batches")


# ----------------------------------------------------------------------------- locating models


def resolve_models(checkpoint: str | Path | None = None, *, run_dir: str | Path | None = None,
                   teacher: str | Path | None = None, hard: str | Path | None = None,
                   int8: str | Path | None = None) -> dict:
    """{"teacher": path|None, "hard": path|None, "int8": path|None, "int8_stage": meta|None,
    "run_dir": path|None, "notes": [...]}.

    `checkpoint` may be a run directory (has stages/) or a deployable INT8 folder (has
    manifest.json); a deployable folder inside a run (runs/X/stages/NN-id/model) also finds its
    run's teacher and hard stages. In a run: teacher = the first ``finetune`` stage, int8 = the
    first ``quantize`` stage, hard = the pruned FP stage that INT8 checkpoint was quantised from
    (``ltp_hard`` or ``distill``, from its meta's source_stage), else the last ``ltp_hard`` stage
    (explicit paths win)."""
    notes: list[str] = []
    paths = {"teacher": None, "hard": None, "int8": None}
    int8_meta = None
    if checkpoint is not None:
        cp = Path(checkpoint)
        if not cp.exists():
            raise BenchError(f"{cp}: not found (expected a run directory or a deployable INT8 checkpoint folder)")
        if (cp / MANIFEST_FILE).is_file():
            paths["int8"] = cp
            containing = RunDir.containing_model(cp)
            if run_dir is None and containing is not None:
                run_dir = containing.path
                notes.append(f"checkpoint is a stage of run {run_dir}: teacher / hard models taken from that run")
            elif run_dir is None:
                notes.append("checkpoint is a standalone deployable folder: no teacher / hard model, only ltp_int8 can run")
        elif RunDir(cp).is_run():
            run_dir = cp
        else:
            raise BenchError(f"{cp}: neither a run directory (recipe.json, stages/) nor a deployable checkpoint ({MANIFEST_FILE})")
    if run_dir is not None:
        run = RunDir(Path(run_dir))
        records = run.finished()
        if not records:
            raise BenchError(f"{run.path}: no finished stages")
        ft = [r for r in records if r.stage == "finetune" and r.model_dir is not None]
        hd = [r for r in records if r.stage == "ltp_hard" and r.model_dir is not None]
        qz = [r for r in records if r.stage == "quantize" and r.model_dir is not None and (r.model_dir / MANIFEST_FILE).is_file()]
        if paths["teacher"] is None and ft:
            paths["teacher"] = ft[0].model_dir
        if paths["hard"] is None and hd:
            paths["hard"] = hd[-1].model_dir
        if paths["int8"] is None and qz:
            paths["int8"], int8_meta = qz[0].model_dir, qz[0].meta
        elif paths["int8"] is not None:
            for r in qz:
                if r.model_dir.resolve() == Path(paths["int8"]).resolve():
                    int8_meta = r.meta
        # the pruned FP model the INT8 checkpoint was quantised from (e.g. a distilled student) is the
        # fair FP counterpart of ltp_int8; the last ltp_hard stage only when the source is unknown
        src = next((r for r in records if int8_meta and r.id == int8_meta.get("source_stage")
                    and r.stage in PRUNED_FP_STAGES and r.model_dir is not None), None)
        if hard is None and src is not None and (not hd or src.model_dir != hd[-1].model_dir):
            paths["hard"] = src.model_dir
            notes.append(f"hard (ltp_fp32) = stage {src.id!r} ({src.stage}), the model the INT8 checkpoint was quantised from")
    for k, v in (("teacher", teacher), ("hard", hard), ("int8", int8)):
        if v is not None:
            paths[k] = Path(v)
    return {**{k: (str(v) if v else None) for k, v in paths.items()}, "int8_stage": int8_meta,
            "run_dir": str(run_dir) if run_dir else None, "notes": notes}



# ----------------------------------------------------------------------------- inputs


@dataclass
class BenchInputs:
    """Everything a system run needs; picklable (sent to spawn children)."""

    task: str
    models: dict
    batches: dict  # bs -> list[Batch]
    calibration: list  # list[Batch]
    calibration_source: str
    labels: list
    threads: int
    repeats: int
    max_seq_length: int
    pad_token_id: int
    quant: dict  # observer / percentile for dense_int8 (from the run's quantize stage)
    backend: str = "auto"
    profile_bs: int | None = 32
    gemm_bench_json: str | None = None
    work_dir: str | None = None  # exported / quantised artifacts (ONNX files) shared by the systems of one run
    extra: dict = field(default_factory=dict)


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




# ----------------------------------------------------------------------------- measuring


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
    if name in ("dense_int8", "ltp_int8"):
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
            agree[str(bs)] = float(np.mean([_same(a, b) for a, b in zip(p, preds)])) if preds else 1.0
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
    if name == "ltp_int8" and inp.profile_bs:
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
            "mean_tokens_per_layer": kept.mean(0).tolist(), "examples": int(len(lengths))}


#: (dense system, pruned system, runtime): realised speedup of token pruning alone on that runtime
PRUNING_PAIRS = (("dense_int8", "ltp_int8", "torch"), ("dense_int8_ort", "ltp_int8_ort", "onnxruntime"))


def add_pruning_speedup(results: dict[str, dict], batch_sizes) -> dict:
    """Per runtime and batch size: speedup of the pruned INT8 model over the dense INT8 model on the
    same runtime, and that speedup divided by the FLOPs reduction it ran at (executed convention,
    measured by the pruned system itself): 1.0 = every FLOP removed is time saved."""
    out = {}
    for dense, pruned, runtime in PRUNING_PAIRS:
        d, p = results.get(dense, {}), results.get(pruned, {})
        if d.get("status") != "ok" or p.get("status") != "ok" or "cost" not in p:
            out[runtime] = {"status": "not measured", "dense": dense, "pruned": pruned}
            continue
        rel = p["cost"]["relative_flops_executed"] / d["cost"]["relative_flops_executed"]
        row = {"dense": dense, "pruned": pruned, "relative_flops_executed": rel, "flops_reduction": 1.0 / rel, "by_batch_size": {}}
        for bs in batch_sizes:
            td, tp = throughput(results, dense, bs), throughput(results, pruned, bs)
            if td and tp:
                row["by_batch_size"][str(bs)] = {"speedup": tp / td, "realised_fraction": (tp / td) * rel}
        out[runtime] = row
    return out


def _same(a, b) -> bool:
    return a == b if isinstance(a, int) else abs(a - b) < 1e-4


# ----------------------------------------------------------------------------- isolation


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


# ----------------------------------------------------------------------------- orchestration


def _load_inputs(models: dict, data_dir: Path, task_name: str, batch_sizes, max_examples, threads, repeats,
                 calibration_batches: int, calibration_batch_size: int, backend: str, profile_bs, gemm_bench_json,
                 work_dir: str | None = None) -> tuple[BenchInputs, dict]:
    import torch

    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, split_file, tokenize_split
    from ltp_compress.modeling.model_io import load_tokenizer
    from ltp_compress.tasks.glue import get_task

    torch.set_num_threads(threads)
    task = get_task(task_name)
    src = next((models[k] for k in ("int8", "teacher", "hard") if models.get(k) and Path(models[k]).is_dir()), None)
    if not src:
        raise BenchError("no model to benchmark")
    tok = load_tokenizer(src)
    max_seq = 128
    quant = {"observer": "minmax", "percentile": None, "fuse_gelu": True}
    if models.get("int8") and (Path(models["int8"]) / MANIFEST_FILE).is_file():
        ltp = read_deployable_info(models["int8"])
        max_seq = int(ltp.get("max_seq_length", max_seq))
        q = ltp.get("quantization") or {}
        quant.update({"observer": q.get("observer") or "minmax", "percentile": q.get("percentile"),
                      "fuse_gelu": bool(q.get("fused_gelu", True))})
    elif models.get("run_dir"):
        max_seq = int(RunDir(Path(models["run_dir"])).recipe().get("data", {}).get("max_seq_length", 128))
    stage_cfg = (models.get("int8_stage") or {}).get("config") or {}
    if stage_cfg:
        quant["observer"] = stage_cfg.get("observer", quant["observer"])
        quant["percentile"] = stage_cfg.get("percentile", quant["percentile"])
        quant["fuse_gelu"] = stage_cfg.get("fuse_gelu", quant["fuse_gelu"])
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BenchError(f"{data_dir}: not a folder (expected a GLUE-format folder with dev.tsv)")
    cfg = DataConfig(source="glue_dir", path=str(data_dir), max_seq_length=max_seq, max_dev_examples=max_examples,
                     max_train_examples=calibration_batches * calibration_batch_size * 4)
    dev = load_split(cfg, task, "dev")
    ts = tokenize_split(dev, tok, max_seq, num_labels=task.num_labels)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = {int(bs): length_bucketed_batches(ts, int(bs), shuffle=False, seed=0, pad_token_id=pad) for bs in batch_sizes}
    train_path = split_file(cfg, task, "train")
    if train_path is not None and train_path.is_file():
        tr = tokenize_split(load_split(cfg, task, "train", seed=0), tok, max_seq, num_labels=task.num_labels)
        calib = length_bucketed_batches(tr, calibration_batch_size, shuffle=True, seed=0, pad_token_id=pad)[:calibration_batches]
        calib_src = f"{train_path}: {len(calib)} shuffled length-bucketed batches of {calibration_batch_size}"
    else:
        calib = length_bucketed_batches(ts, calibration_batch_size, shuffle=True, seed=0, pad_token_id=pad)[:calibration_batches]
        calib_src = f"DEV data ({dev.source}; no train file found): {len(calib)} batches of {calibration_batch_size} - calibration overlaps the evaluation set"
    inp = BenchInputs(task=task_name, models={k: models.get(k) for k in ("teacher", "hard", "int8")}, batches=batches,
                      calibration=calib, calibration_source=calib_src, labels=list(ts.labels), threads=threads,
                      repeats=repeats, max_seq_length=max_seq, pad_token_id=int(pad), quant=quant, backend=backend,
                      profile_bs=profile_bs, gemm_bench_json=str(gemm_bench_json) if gemm_bench_json else None,
                      work_dir=work_dir)
    meta = {"dev_source": dev.source, "examples": len(ts), "mean_tokens": float(ts.lengths.mean()),
            "max_tokens": int(ts.lengths.max()), "max_seq_length": max_seq, "calibration": calib_src,
            "quant_config_for_dense_int8": quant, "tokenization": TOKENIZATION}
    return inp, meta




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
        agree = float(np.mean([_same(a, b) for a, b in zip(r["predictions"], rr["predictions"])]))
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


def run_benchmark(checkpoint: str | Path | None = None, *, run_dir: str | Path | None = None,
                  teacher: str | Path | None = None, hard: str | Path | None = None, int8: str | Path | None = None,
                  data_dir: str | Path, task: str, threads: int = 2, batch_sizes=(1, 8, 32),
                  max_examples: int | None = None, repeats: int = 3, rounds: int = 1, systems=None,
                  isolation: str = "subprocess", calibration_batches: int = 16, calibration_batch_size: int = 32,
                  backend: str = "auto", profile_bs: int | None = 32,
                  gemm_bench_json: str | Path | None = "benchmarks/results/gemm_bench.json",
                  work_dir: str | Path | None = None,
                  out_dir: str | Path | None = None, name: str = "e2e_bench", command: str | None = None,
                  log=print) -> dict:
    """Benchmark the systems (default: all of :data:`SYSTEMS`) on the dev set; returns the result
    dict and, with `out_dir`, writes `<out_dir>/<name>.json` and `.md`.

    Models: `checkpoint` (run directory or deployable INT8 folder) and/or `run_dir`, with
    explicit `teacher` / `hard` / `int8` paths overriding what the run provides. A system whose
    model or package is missing or which raises is recorded as failed with the reason. Exported /
    quantised artifacts go to `work_dir` (kept) or to a temporary folder (removed at the end)."""
    systems = list(systems) if systems else list(SYSTEMS)
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise BenchError(f"unknown systems {bad}; choose from {list(SYSTEMS)}")
    if isolation not in ("subprocess", "inprocess"):
        raise BenchError("isolation must be 'subprocess' or 'inprocess'")
    if int(rounds) < 1 or int(repeats) < 1:
        raise BenchError("rounds and repeats must be >= 1")
    batch_sizes = sorted({int(b) for b in batch_sizes})
    models = resolve_models(checkpoint, run_dir=run_dir, teacher=teacher, hard=hard, int8=int8)
    load0 = _loadavg()
    tmp_work = None
    if work_dir is None:
        tmp_work = work_dir = tempfile.mkdtemp(prefix="ltp-bench-")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    try:
        inp, data_meta = _load_inputs(models, Path(data_dir), task, batch_sizes, max_examples, threads, repeats,
                                      calibration_batches, calibration_batch_size, backend, profile_bs, gemm_bench_json,
                                      str(work_dir))
        per_round: dict[str, list] = {s: [] for s in systems}
        for rnd in range(int(rounds)):
            for s in systems:
                need = NEEDS[s]
                missing = _missing_packages(s)
                if not models.get(need) or missing:
                    why = f"no {need} model available for this checkpoint" if not models.get(need) else \
                        f"package(s) {missing} not installed (pip install -c requirements-lock.txt -e '.[peers,onnx]')"
                    per_round[s].append({"system": s, "status": "failed", "error": why})
                    log(f"[bench] {s}: not run ({why})")
                    continue
                log(f"[bench] round {rnd + 1}/{rounds} {s}: running ({isolation})")
                t0 = time.perf_counter()
                r = run_system(s, inp, isolation)
                r["wall_s_total"] = time.perf_counter() - t0
                per_round[s].append(r)
                if r.get("status") == "ok":
                    log(f"[bench] {s}: {r['metrics'].get('main', float('nan')):.4f} main metric; "
                        + ", ".join(f"bs{x['batch_size']} {x['examples_per_s']:.1f} ex/s" for x in r["runs"]))
                else:
                    log(f"[bench] {s}: FAILED: {r.get('error')}")
    finally:
        if tmp_work is not None:
            shutil.rmtree(tmp_work, ignore_errors=True)
    results = {s: merge_rounds(v) for s, v in per_round.items()}
    best_peer = add_ratios(results, batch_sizes)
    pruning_speedup = add_pruning_speedup(results, batch_sizes)
    add_accuracy_gaps(results)
    import torch

    from ltp_compress.kernels import cpu_isa

    out = {
        "format": "ltp-compress-e2e-bench", "version": 2,
        "command": command or " ".join(sys.argv),
        "task": task, "data_dir": str(data_dir), "models": {k: models[k] for k in ("teacher", "hard", "int8", "run_dir")},
        "checkpoints": {k: checkpoint_identity(models[k]) for k in ("teacher", "hard", "int8")},
        "model_notes": models["notes"], "threads": threads, "batch_sizes": batch_sizes, "repeats": repeats,
        "rounds": int(rounds), "max_examples": max_examples, "isolation": isolation, "data": data_meta,
        "tokenization": TOKENIZATION, "baseline": BASELINE,
        "work_dir": None if tmp_work is not None else str(work_dir),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                        "cpu_isa": _safe(cpu_isa), "cpu_count": os.cpu_count(),
                        **{d: version(d) for d in ("neural-compressor", "torchao", "transformers", "onnx", "onnxruntime",
                                                   "openvino", "nncf")}},
        "loadavg_before": load0, "loadavg_after": _loadavg(),
        "systems": systems, "best_int8_peer": best_peer, "pruning_speedup": pruning_speedup, "results": results,
        "method": ("same tokenised dev examples and the same length-bucketed, dynamically padded batches for every system "
                   "(tokenisation outside the timed region); throughput = examples / median of `repeats` timed passes after "
                   "one warmup pass (warmup includes compilation), median over `rounds` interleaved rounds; bs-1 latency "
                   "percentiles over every example of the timed passes; accuracy from the warmup pass at the largest batch size"),
    }
    if out_dir is not None:
        write_outputs(out, Path(out_dir), name)
    return out


def _missing_packages(name: str) -> list[str]:
    from ltp_compress.pipeline.peers import missing_packages

    return missing_packages(name)


def _safe(fn):
    try:
        return fn()
    except Exception as e:
        return str(e)


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ----------------------------------------------------------------------------- output


def _fmt(v, nd=1, suffix=""):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}{suffix}"


def _first(v):
    return v[0] if isinstance(v, list) else v


def render_pruning_speedup(res: dict) -> list[str]:
    """The realised speedup of token pruning alone per runtime (issue goal: >= 0.9 of the FLOPs reduction)."""
    ps = res.get("pruning_speedup") or {}
    if not ps:
        return []
    bss = res["batch_sizes"]
    L = ["## Token pruning alone: realised speedup vs FLOPs reduction", "",
         "pruned INT8 vs dense INT8 on the same runtime; FLOPs reduction = dense / pruned relative FLOPs (executed convention), "
         "counted from the tokens each system's own runtime reports entering each layer on the main-batch-size pass; "
         "realised fraction = speedup / FLOPs reduction", "",
         "| runtime | pruned / dense | FLOPs reduction | " + " | ".join(f"bs{b} speedup | bs{b} realised" for b in bss) + " |",
         "|" + "---|" * (3 + 2 * len(bss))]
    for runtime, row in ps.items():
        if "by_batch_size" not in row:
            L.append(f"| {runtime} | {row['pruned']} / {row['dense']} | {row.get('status')} |" + " |" * (2 * len(bss)))
            continue
        cells = []
        for b in bss:
            x = row["by_batch_size"].get(str(b))
            cells += [_fmt(x["speedup"], 2, "x"), _fmt(x["realised_fraction"], 2)] if x else ["-", "-"]
        L.append(f"| {runtime} | {row['pruned']} / {row['dense']} | {_fmt(row['flops_reduction'], 2, 'x')} | " + " | ".join(cells) + " |")
    return L + [""]


def render_markdown(res: dict) -> str:
    bss = res["batch_sizes"]
    L = ["# End-to-end inference benchmark", "",
         f"task `{res['task']}`, {res['data']['examples']} dev examples (mean {res['data']['mean_tokens']:.1f} tokens, "
         f"max {res['data']['max_tokens']}), {res['threads']} threads, batch sizes {bss}, {res['repeats']} timed repeats, "
         f"{res.get('rounds', 1)} interleaved round(s), isolation: {res['isolation']}; tokenisation {res.get('tokenization', '')}", "",
         f"models: teacher `{res['models']['teacher']}`, hard `{res['models']['hard']}`, int8 `{res['models']['int8']}`", ""]
    for role, ident in (res.get("checkpoints") or {}).items():
        if ident:
            L.append(f"- {role}: recipe `{ident.get('recipe')}`, stage `{ident.get('stage')}`, "
                     + ", ".join(f"{k} sha256 `{v[:16]}…`" for k, v in ident.get("files", {}).items()))
    L += ["",
         f"load average before / after: {res['loadavg_before']} / {res['loadavg_after']} "
         "(other processes on the machine distort timings)", ""]
    overlapped = [s for s in res["systems"] if any("pass" in x for x in (res["results"][s].get("runs") or []))]
    if overlapped:
        L += ["batch sizes > 1 run as several requests at once (the runtime's throughput setting: OpenVINO's THROUGHPUT hint "
              "with an AsyncInferQueue; ONNX Runtime's thread-safe Run from `threads` threads on a one-thread session; "
              "each system's info.settings in the JSON): " + ", ".join(overlapped) + "; every other system one batch at a time", ""]
    head = ["system", "main metric", "accuracy"] + [f"bs{b} ex/s" for b in bss] + ["bs1 p50 ms", "bs1 p95 ms", "peak RSS MB"]
    head += ["INT8 vs FP32 (points)", "fast ops"]
    head += [f"bs{b} vs {res.get('baseline', 'baseline')}" for b in bss] + [f"bs{b} vs best INT8 peer" for b in bss] + ["setup s", "warmup s"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["systems"]:
        r = res["results"][s]
        if r.get("status") != "ok":
            reason = str(r.get("error", "unknown")).replace("|", "/").replace("\n", " ")[:160]
            L.append(f"| {s} | failed: {reason} |" + " |" * (len(head) - 2))
            continue
        thr = {x["batch_size"]: x for x in r["runs"]}
        rss = r.get("peak_rss_mb")
        rss_s = _fmt(rss, 0) if rss is not None else (f"+{_fmt(r.get('rss_growth_mb'), 0)} (growth)")
        row = [s, _fmt(r["metrics"].get("main"), 4), _fmt(r.get("accuracy"), 4)]
        row += [_fmt(thr[b]["examples_per_s"]) if b in thr else "-" for b in bss]
        row += [_fmt(r.get("latency_ms_p50"), 2), _fmt(r.get("latency_ms_p95"), 2), rss_s]
        gap = r.get("accuracy_vs_fp32") or {}
        gap_s = "-" if "gap_points" not in gap else (f"{gap['gap_points']:+.1f} vs {gap['reference']}" + (" **FLAG**" if gap["flag"] else ""))
        fo = r.get("fast_ops")
        row += [gap_s, "-" if not fo else ("confirmed" if fo["confirmed"] else "**NOT confirmed**")]
        row += [_fmt(r["ratios"][str(b)]["vs_baseline"], 2, "x") for b in bss]
        row += [_fmt(r["ratios"][str(b)]["vs_best_int8_peer"], 2, "x") for b in bss]
        setup = r.get("setup_s")
        row += [_fmt(setup if not isinstance(setup, list) else statistics.median(setup), 1),
                " / ".join(_fmt(_first(thr[b]["warmup_s"]), 1) for b in bss if b in thr)]
        L.append("| " + " | ".join(row) + " |")
    L += ["", "best dense INT8 peer per batch size: "
          + ", ".join(f"bs{b}: {(v or {}).get('system', 'none')}" for b, v in res["best_int8_peer"].items()), ""]
    L += render_pruning_speedup(res)
    L += ["## Systems", ""]
    for s in res["systems"]:
        r = res["results"][s]
        info = r.get("info", {})
        line = f"- `{s}`: {DESCRIPTIONS.get(s, '')}"
        if info.get("api"):
            line += f"; API: `{info['api']}`"
        if r.get("status") != "ok":
            line += f"; **failed**: {r.get('error')}"
        else:
            if info.get("settings"):
                line += f"; settings: `{json.dumps(info['settings'], default=str)}`"
            docs = info.get("docs")
            if docs:
                line += "; docs: " + ", ".join(docs if isinstance(docs, list) else [docs])
            rp = r.get("runtime_profile")
            if rp:
                counts = rp.get("op_counts_per_run") or rp.get("runtime_layers") or rp.get("error")
                line += f"; runtime profile ({rp.get('tool', 'failed')}): {counts}"
            if r.get("fast_ops"):
                line += f"; fast ops: {r['fast_ops']['found']}"
            ops = r.get("int8_ops_observed")
            if ops is not None:
                line += f"; int8 ops seen by the profiler: {ops if ops else 'none'}"
            if r.get("kernel_counters") is not None:
                line += f"; kernel counters: {r['kernel_counters']}"
            for n in info.get("notes") or []:
                line += f"; note: {n}"
            if info.get("shapes"):
                line += f"; shapes: {info['shapes']}"
        L.append(line)
    L += ["", f"calibration for every statically quantised system: {res['data']['calibration']}", ""]
    prof = (res["results"].get("ltp_int8") or {}).get("profile")
    if prof:
        L += [f"## Profile: ltp_int8 at bs {prof.get('batch_size')}", ""]
        if prof.get("status") != "ok":
            L.append(f"failed: {prof.get('error')}")
        else:
            L += ["| op class | self CPU s | fraction |", "|---|---|---|"]
            for k, v in prof["time_by_summary_class_s"].items():
                L.append(f"| **{k}** | {v:.4f} | {prof['fraction_by_summary_class'].get(k, 0):.1%} |")
            for k, v in prof["time_by_class_s"].items():
                L.append(f"| {k} | {v:.4f} | {prof['fraction_by_class'].get(k, 0):.1%} |")
            ref = prof.get("standalone_reference") or {}
            L += ["", f"INT8 GEMMs inside the model: {prof['int8_linear_calls']} calls, {prof['int8_gemm_macs'] / 1e9:.3f} GMAC, "
                  f"kernel time {prof['int8_gemm_kernel_s']:.4f} s -> effective {_fmt(prof['effective_gemm_gops'], 1)} GOP/s "
                  f"(incl. activation quantisation: {_fmt(prof['effective_int8_linear_gops_incl_quantize'], 1)} GOP/s); "
                  f"best standalone at the model's shapes {_fmt(ref.get('gops'), 1)} GOP/s "
                  f"(measured now: {ref.get('measured')}; gemm_bench.json at model shapes: {ref.get('gemm_bench_best_model_shapes')}, "
                  f"any shape: {ref.get('gemm_bench_best_any_shape')}); "
                  f"efficiency {_fmt(prof.get('gemm_efficiency_vs_best_standalone'), 2)}", ""]
    L += ["", res["method"], "", f"command: `{res['command']}`", ""]
    return "\n".join(L)


def write_outputs(res: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, mp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jp.write_text(json.dumps(res, indent=2, default=str))
    mp.write_text(render_markdown(res))
    return jp, mp


def bench_cli(args, command: str | None = None) -> int:
    """Run the benchmark from parsed `bench_args.add_bench_arguments` arguments; print the Markdown table."""
    res = run_benchmark(args.checkpoint, run_dir=args.run_dir, teacher=args.teacher, hard=args.hard, data_dir=args.data,
                        task=args.task, threads=args.threads,
                        batch_sizes=[int(x) for x in args.batch_sizes.split(",") if x.strip()],
                        max_examples=args.max_examples, repeats=args.repeats, rounds=args.rounds,
                        systems=[x.strip() for x in args.systems.split(",")] if args.systems else None,
                        isolation=args.isolation, calibration_batches=args.calibration_batches, backend=args.backend,
                        profile_bs=args.profile_bs or None, gemm_bench_json=args.gemm_bench, work_dir=args.work_dir,
                        out_dir=args.out_dir,
                        name=args.name, command=command or "ltp-compress " + " ".join(sys.argv[1:]),
                        log=lambda m: print(m, file=sys.stderr))
    print(render_markdown(res))
    print(f"wrote {Path(args.out_dir) / (args.name + '.json')} and {args.name}.md", file=sys.stderr)
    failed = [s for s, r in res["results"].items() if r.get("status") != "ok"]
    if failed:
        print(f"note: failed systems: {failed} (see the JSON for the errors)", file=sys.stderr)
    return 0
