"""Spike for issue 24 option (a): the fused C++ runtime (modeling/fused_runtime.py) against the torch
runtime (the reference, modeling/deploy.py) and the ONNX export on onnxruntime, at batch size 1.

Every dev example runs one at a time through (a) torch, (b) onnxruntime (the checkpoint exported
to a temporary folder first, unless --onnx names an export), (c) fused, in interleaved rounds
(each round times every system once over the whole dev set; the median round is reported).
Reported per system: examples/s, per-forward latency p50 / p90 (over every forward of every
round), and agreement with the reference: predicted labels and kept tokens per layer (the share
of examples whose kept-token counts equal torch's at every layer), max |logit difference|.

    .venv/bin/python benchmarks/fused_spike.py CHECKPOINT --data ../shared/data/glue/SST-2 --task sst2 --threads 1

Writes benchmarks/results/<name>.json and .md (with the environment block of pipeline/environment.py).
Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _harness import checkpoint_bench_parser, dev_feeds, environment_block, environment_summary, loadavg


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main(argv=None) -> dict:
    p = checkpoint_bench_parser(__doc__.splitlines()[0], "fused_spike")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="first N dev examples only (smoke runs)")
    p.add_argument("--onnx", type=Path, default=None, help="an existing ONNX export of the checkpoint (default: export now)")
    p.add_argument("--kernel", default="avx512_vnni", help="fused runtime GEMM kernel")
    args = p.parse_args(argv)

    from ltp_compress.modeling.deploy import load_deployable
    from ltp_compress.modeling.fused_runtime import load_fused
    from ltp_compress.modeling.onnx_export import export_onnx
    from ltp_compress.modeling.onnx_runtime import load_onnx

    torch.set_num_threads(args.threads)
    feeds, n_examples = dev_feeds(args.checkpoint, args.data, args.task, [1])
    items = feeds[1][: args.limit] if args.limit else feeds[1]
    torch_items = [{k: torch.from_numpy(v) for k, v in f.items()} for f in items]
    tmp = None
    if args.onnx is None:
        tmp = tempfile.TemporaryDirectory(prefix="fused_spike_")
        args.onnx = export_onnx(args.checkpoint, Path(tmp.name) / "onnx")
    systems = {
        "torch": load_deployable(args.checkpoint),
        "onnxruntime": load_onnx(args.onnx, threads=args.threads),
        "fused": load_fused(args.checkpoint, kernel=args.kernel, threads=args.threads),
    }
    inputs = {"torch": torch_items, "onnxruntime": items, "fused": torch_items}

    def run_all(name: str):
        model, logits, kept, lat = systems[name], [], [], []
        for it in inputs[name]:
            t0 = time.perf_counter()
            out = model.logits(it)
            lat.append(time.perf_counter() - t0)
            logits.append(np.asarray(out))
            kept.append(np.asarray(model.last_kept_tokens))
        return np.concatenate(logits), np.concatenate(kept), lat

    for name in systems:  # warm-up pass (first-call allocations, thread pools)
        run_all(name)
    load_start = loadavg()
    rounds = {k: [] for k in systems}
    latencies = {k: [] for k in systems}
    outputs = {}
    for _ in range(args.rounds):
        for name in systems:
            t0 = time.perf_counter()
            logits, kept, lat = run_all(name)
            rounds[name].append(len(items) / (time.perf_counter() - t0))
            latencies[name] += lat
            outputs[name] = (logits, kept)
    env = environment_block(args.threads, load_start)
    ref_logits, ref_kept = outputs["torch"]
    results = {}
    for name in systems:
        logits, kept = outputs[name]
        results[name] = {
            "examples_per_s": statistics.median(rounds[name]), "examples_per_s_rounds": rounds[name],
            "latency_p50_ms": 1e3 * _percentile(latencies[name], 50), "latency_p90_ms": 1e3 * _percentile(latencies[name], 90),
            "prediction_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
            "kept_tokens_agreement": float((kept == ref_kept).all(1).mean()),
            "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
            "backend": getattr(systems[name], "backend", None),
        }
    results["fused"]["kernel_path"] = systems["fused"].kernel_path()
    report = {"benchmark": "fused_spike", "checkpoint": str(args.checkpoint), "task": args.task, "batch_size": 1,
              "examples": len(items), "dev_examples": n_examples, "threads": args.threads, "rounds": args.rounds,
              "results": results, "environment": env}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Fused runtime spike: {args.task}, batch size 1, {len(items)} examples, {args.threads} thread(s)", "",
             environment_summary(env), "",
             "| system | ex/s (median of rounds) | p50 ms | p90 ms | predictions = torch | kept tokens = torch | max abs logit diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['examples_per_s']:.1f} | {r['latency_p50_ms']:.3f} | {r['latency_p90_ms']:.3f} | "
                     f"{r['prediction_agreement']:.4f} | {r['kept_tokens_agreement']:.4f} | {r['max_abs_logit_diff']:.2e} |")
    lines += ["", f"fused GEMM kernel: {results['fused']['kernel_path']}", ""]
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
