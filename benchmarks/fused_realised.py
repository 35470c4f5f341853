"""Fused runtime: where the pruned model's realised speedup goes, phase by phase (not a test).

The end-to-end benchmark reports how much of the FLOPs reduction token pruning turns into speed on the
fused runtime (pruned INT8 vs dense INT8, both fused). This splits that ratio: the pruned and the dense
checkpoint run their dev set in the end-to-end benchmark's batches, one call of `threads` threads per
batch (no concurrent streams: each call's clock is its own), the two interleaved inside every round.
Per round and batch size it records the wall time of the pass (perf_counter around the calls) and the
extension's own phase clock for the same calls (`FusedEncoder.phase_profile`), and the integer-GEMM MACs
from the tokens the runtime reports entering each layer. Reports, medians over rounds, per example:
wall, the phases, what lies outside them (wall - phases: Python, input checks, output tensors), and the
pruned / dense ratio of each, beside the ratio of the work (GEMM MACs, the FLOPs the runtime runs).

    python benchmarks/fused_realised.py runs/sst2_minilm/stages/05-int8_full_range/model \\
        --dense /tmp/bench_sst2_work3/dense_int8_ckpt --data ../shared/data/glue/SST-2 --task sst2 --threads 2

An A/B of kernel sources (another revision's kernels/fused/, built beside this checkout's; the files record
which sources ran, `kernel_sources`):

    git archive <rev> kernels/fused | tar -x -C /tmp/src_<rev>
    LTP_FUSED_SOURCE_DIR=/tmp/src_<rev>/kernels/fused python benchmarks/fused_realised.py ... --name <name>_sources_<rev>

Writes <out-dir>/<name>.json and .md with the environment block. Timings mean something only on an
otherwise idle machine.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import checkpoint_bench_parser, dev_feeds, environment_block, environment_summary, loadavg  # noqa: E402
from fused_phase_profile import PHASES  # noqa: E402


def phase_work(kept, d: int, d_ff: int) -> dict[str, float]:
    """MACs per phase of one forward from the tokens entering each layer (kept [b, L]): qkv on the tokens
    entering (3·d·d each); out (d·d) and ffn (2·d·d_ff) on the tokens leaving (the last layer: [CLS]);
    attention Q·Kᵀ and P·V, n·n·d each per layer of a sequence of n tokens (the last layer: the [CLS] query, n·d)."""
    import numpy as np

    k = np.asarray(kept, dtype=np.float64)  # [b, L]
    b, L = k.shape
    leaving = np.concatenate([k[:, 1:], np.ones((b, 1))], axis=1)
    att = (2 * k[:, :-1] ** 2 * d).sum() + (2 * k[:, -1] * d).sum()
    return {"qkv": float((k * 3 * d * d).sum()), "attention": float(att), "out": float((leaving * d * d).sum()),
            "ffn": float((leaving * 2 * d * d_ff).sum())}


def main(argv=None) -> dict:
    p = checkpoint_bench_parser(__doc__.splitlines()[0], "fused_realised")
    p.add_argument("--dense", type=Path, required=True, help="the dense INT8 deployable checkpoint (the bench's dense_int8_ckpt)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    import torch

    from ltp_compress.kernels.fused_encoder import source_info
    from ltp_compress.modeling.fused_runtime import load_fused

    load0 = loadavg()
    bss = [int(x) for x in args.batch_sizes.split(",")]
    systems = {}
    for label, ck in (("pruned", args.checkpoint), ("dense", args.dense)):
        feeds, n = dev_feeds(ck, args.data, args.task, bss)
        model = load_fused(ck, threads=args.threads)
        systems[label] = (model, {bs: [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds[bs]] for bs in bss}, n)
    cfg = systems["pruned"][0].model.config
    per_round = {label: {bs: [] for bs in bss} for label in systems}
    work = {label: {} for label in systems}
    for label, (model, items, _) in systems.items():  # warm-up pass; the work of each pass (the same every pass)
        for bs in bss:
            w = {}
            for b in items[bs]:
                _, kept = model.encoder.forward(b["input_ids"], b["attention_mask"], b["token_type_ids"], args.threads)
                for k, v in phase_work(kept, cfg.hidden_size, cfg.intermediate_size).items():
                    w[k] = w.get(k, 0.0) + v
            work[label][bs] = w
    for _ in range(args.rounds):
        for label, (model, items, n) in systems.items():
            enc = model.encoder
            for bs in bss:
                enc.phase_profile(True)
                t0 = time.perf_counter()
                for b in items[bs]:
                    model.logits(b)
                wall = time.perf_counter() - t0
                prof = enc.phase_profile(True)
                per_round[label][bs].append({"wall": wall / n, **{k: prof[k] / n for k in PHASES}})
    rows = {}
    for bs in bss:
        row = {}
        for label in systems:
            rs = per_round[label][bs]
            med = {k: statistics.median(r[k] for r in rs) for k in ("wall", *PHASES)}
            phases = statistics.median(sum(r[k] for k in PHASES) for r in rs)
            outside = statistics.median(r["wall"] - sum(r[k] for k in PHASES) for r in rs)
            row[label] = {"ms_per_example": {k: 1e3 * v for k, v in med.items()}, "phases_ms_per_example": 1e3 * phases,
                          "outside_ms_per_example": 1e3 * outside, "gemm_macs_per_example": sum(work[label][bs][k] for k in ("qkv", "out", "ffn")) / systems[label][2],
                          "wall_ms_per_round": [1e3 * r["wall"] for r in rs]}
        pr, de = row["pruned"], row["dense"]
        row["ratio_dense_over_pruned"] = {
            "work_gemm_macs": de["gemm_macs_per_example"] / pr["gemm_macs_per_example"],
            "wall": de["ms_per_example"]["wall"] / pr["ms_per_example"]["wall"],
            "phases": de["phases_ms_per_example"] / pr["phases_ms_per_example"],
            **{k: de["ms_per_example"][k] / pr["ms_per_example"][k] if pr["ms_per_example"][k] > 0 else None for k in PHASES}}
        row["work_ratio_dense_over_pruned"] = {k: work["dense"][bs][k] / work["pruned"][bs][k] for k in work["pruned"][bs]}
        rows[bs] = row
    env = environment_block(args.threads, load0)
    out = {"command": "python benchmarks/fused_realised.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "checkpoint": str(args.checkpoint), "dense": str(args.dense), "task": args.task, "threads": args.threads,
           "rounds": args.rounds, "kernel_path": systems["pruned"][0].kernel_path(), "kernel_sources": source_info(), "rows": rows,
           "environment": env}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from ltp_compress.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(args.out_dir / f"{args.name}.json", out)
    lines = [f"# Fused runtime: where the realised speedup of pruning goes ({args.task})", "",
             f"command: `{out['command']}`", "", f"environment: {environment_summary(env)}", "",
             f"kernel path: {out['kernel_path']}", "",
             "kernel sources: " + ("this checkout's kernels/fused" if out["kernel_sources"]["checkout_sources"] else
                                   f"`{out['kernel_sources']['dir']}` (LTP_FUSED_SOURCE_DIR), not this checkout's")
             + f" (files hash {out['kernel_sources']['hash']})", "",
             f"ms per example, median of {args.rounds} interleaved rounds, one call of {args.threads} threads per batch; "
             "phases: the extension's own clock for the same calls; outside = wall - phases. Ratio = dense / pruned "
             "(the speedup pruning gives there); work = the integer-GEMM MACs the runtime runs (the tokens it reports "
             "entering each layer, the last layer on [CLS]).", "",
             "| bs | model | wall | " + " | ".join(PHASES) + " | phases | outside |", "|---|---|" + "---|" * (len(PHASES) + 3)]
    for bs, row in rows.items():
        for label in systems:
            r = row[label]
            lines.append(f"| {bs} | {label} | {r['ms_per_example']['wall']:.3f} | "
                         + " | ".join(f"{r['ms_per_example'][k]:.3f}" for k in PHASES)
                         + f" | {r['phases_ms_per_example']:.3f} | {r['outside_ms_per_example']:.3f} |")
        q = row["ratio_dense_over_pruned"]
        lines.append(f"| {bs} | **dense / pruned** (work {q['work_gemm_macs']:.2f}x) | **{q['wall']:.2f}x** | "
                     + " | ".join("-" if q[k] is None else f"{q[k]:.2f}x" for k in PHASES) + f" | {q['phases']:.2f}x | - |")
        w = row["work_ratio_dense_over_pruned"]
        lines.append(f"| {bs} | work dense / pruned | - | " + " | ".join(f"{w[k]:.2f}x" if k in w else "-" for k in PHASES) + " | - | - |")
    lines += ["", "realised fraction of the work's reduction (wall ratio / work ratio): "
              + ", ".join(f"bs {bs} {row['ratio_dense_over_pruned']['wall'] / row['ratio_dense_over_pruned']['work_gemm_macs']:.2f}"
                          for bs, row in rows.items()), "",
              "time pruned loses against its work, per phase (ms per example: pruned time - dense time / that phase's work "
              "ratio; embed, select and head do not shrink with pruning): "
              + "; ".join(f"bs {bs} " + ", ".join(
                  f"{k} {r['pruned']['ms_per_example'][k] - r['dense']['ms_per_example'][k] / r['work_ratio_dense_over_pruned'].get(k, 1e9):+.3f}"
                  for k in PHASES) for bs, r in rows.items()), ""]
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
