"""End-to-end inference benchmark: our pruned / INT8 runtimes vs what users deploy.

The systems are built by `pipeline/peers/` (one module per family; names and groups in
`pipeline/bench_args.py`, which also holds the command line shared by `ltp-compress bench` and
benchmarks/e2e_bench.py). This module runs the benchmark: every system runs on the SAME tokenised dev
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

The jobs live in their own modules: bench_models.py (locating the models of a run directory or
checkpoint), bench_inputs.py (the tokenised batches), bench_measure.py (measuring one system, in a
spawn child or in process), bench_analysis.py (ratios, best peer, accuracy gaps, pruning speedup,
rounds), bench_render.py (Markdown), environment.py (which machine and ISA made the result).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from ltp_compress.pipeline.bench_analysis import (  # noqa: F401 (re-exported)
    ACCURACY_GAP_POINTS, PRUNING_PAIRS, add_accuracy_gaps, add_best_dense_peer, add_pruning_speedup, add_ratios, merge_rounds,
    throughput)
from ltp_compress.pipeline.bench_args import BASELINE, FP32_PEERS, INT8_PEERS, OURS, SYSTEMS  # noqa: F401 (re-exported)
from ltp_compress.pipeline.bench_inputs import TOKENIZATION, BenchInputs, load_inputs  # noqa: F401 (re-exported)
from ltp_compress.pipeline.bench_measure import DESCRIPTIONS, NEEDS, measure_system, run_system  # noqa: F401 (re-exported)
from ltp_compress.pipeline.bench_models import resolve_models
from ltp_compress.pipeline.bench_render import render_markdown, write_outputs
from ltp_compress.pipeline.environment import environment_block, loadavg
from ltp_compress.pipeline.peers import build as build_system  # noqa: F401 (re-exported)
from ltp_compress.pipeline.peers.common import BenchError, checkpoint_identity


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
    if not batch_sizes or batch_sizes[0] < 1:
        raise BenchError(f"batch sizes {batch_sizes}: give one or more batch sizes >= 1")
    models = resolve_models(checkpoint, run_dir=run_dir, teacher=teacher, hard=hard, int8=int8)
    load0 = loadavg()
    tmp_work = None
    if work_dir is None:
        tmp_work = work_dir = tempfile.mkdtemp(prefix="ltp-bench-")
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    try:
        inp, data_meta = load_inputs(models, Path(data_dir), task, batch_sizes, max_examples, threads, repeats,
                                      calibration_batches, calibration_batch_size, backend, profile_bs, gemm_bench_json,
                                      str(work_dir))
        inp.environment = environment_block(threads, load0)  # what the children compare gemm_bench.json against
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
    best_dense = add_best_dense_peer(results, batch_sizes)
    env = environment_block(threads, load0)
    out = {
        "format": "ltp-compress-e2e-bench", "version": 2,
        "command": command or " ".join(sys.argv),
        "task": task, "data_dir": str(data_dir), "models": {k: models[k] for k in ("teacher", "hard", "int8", "run_dir")},
        "checkpoints": {k: checkpoint_identity(models[k]) for k in ("teacher", "hard", "int8")},
        "model_notes": models["notes"], "threads": threads, "batch_sizes": batch_sizes, "repeats": repeats,
        "rounds": int(rounds), "max_examples": max_examples, "isolation": isolation, "data": data_meta,
        "tokenization": TOKENIZATION, "baseline": BASELINE,
        "work_dir": None if tmp_work is not None else str(work_dir),
        "environment": env,
        "loadavg_before": env["loadavg_start"], "loadavg_after": env["loadavg_end"],
        "systems": systems, "best_int8_peer": best_peer, "best_dense_peer": best_dense, "pruning_speedup": pruning_speedup, "results": results,
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


def bench_cli(args, command: str | None = None) -> int:
    """Run the benchmark from parsed `bench_args.add_bench_arguments` arguments; print the Markdown table."""
    res = run_benchmark(args.checkpoint, run_dir=args.run_dir, teacher=args.teacher, hard=args.hard, data_dir=args.data,
                        task=args.task, threads=args.threads,
                        batch_sizes=args.batch_sizes,
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
