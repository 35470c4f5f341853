"""Fused runtime: its int8 GEMM kernels side by side (avx512_vnni, hand-written; onednn_brgemm,
oneDNN's brgemm ukernel, AMX tiles where the CPU has them), per GEMM and per whole model.

GEMMs: the checkpoint's four encoder shapes (QKV, attention output, FFN up, FFN down) at a few row
counts, one weight called again and again (in cache), µs per call, the fastest of `--rounds`
interleaved rounds. Model: the checkpoint's dev set in the end-to-end benchmark's length-bucketed
batches through `load_fused(kernel=...)`, one call of `threads` threads per batch, ms per example
(median of `--rounds` interleaved rounds) and the GEMM phases' share by the extension's clock; the
kernels' logits and kept tokens are compared on every batch (they must be bit-equal: exact int32
sums, one epilogue).

    python benchmarks/fused_gemm_kernels.py runs/sst2_minilm/stages/05-int8_full_range/model \\
        --data ../shared/data/glue/SST-2 --task sst2 --threads 2
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import checkpoint_bench_parser, dev_feeds, environment_block, environment_summary, loadavg  # noqa: E402

GEMM_PHASES = ("qkv", "out", "ffn")


def _per_call(fn, calls: int) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main(argv=None) -> dict:
    p = checkpoint_bench_parser(__doc__.splitlines()[0], "fused_gemm_kernels")
    p.add_argument("--kernels", default="avx512_vnni,onednn_brgemm", help="fused GEMM kernels, the first is the baseline")
    p.add_argument("--rows", default="1,4,8,25,48,100,200")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    from ltp_compress.fileio import atomic_write_json, atomic_write_text
    from ltp_compress.kernels import fused_encoder
    from ltp_compress.modeling.fused_runtime import load_fused

    load0 = loadavg()
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for k in kernels:
        reason = fused_encoder.gemm_kernel_unavailable_reason(k)
        if reason is not None:
            raise SystemExit(f"fused GEMM kernel {k!r} is not available here: {reason}")
    ext = fused_encoder.build()
    torch.set_num_threads(args.threads)
    models = {k: load_fused(args.checkpoint, kernel=k, threads=args.threads) for k in kernels}
    cfg = models[kernels[0]].model.config
    d, dff = cfg.hidden_size, cfg.intermediate_size
    shapes = {"qkv": (d, 3 * d), "out": (d, d), "ffn_up": (d, dff), "ffn_down": (dff, d)}

    # ---- GEMMs
    gen = torch.Generator().manual_seed(0)
    gemm_rows = []
    for name, (K, N) in shapes.items():
        w_q, w_s, b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen), torch.rand(N, generator=gen) * 0.01, torch.randn(N, generator=gen)
        ws = {k: ext.Int8Weight(w_q, w_s, b, 0.05, -128, name == "ffn_up", k) for k in kernels}
        for M in (int(v) for v in args.rows.split(",")):
            x = torch.randn(M, K, generator=gen)
            best = {}
            for _ in range(args.rounds):
                for k, w in ws.items():
                    t = _per_call(lambda w=w: w.linear(x), args.calls)
                    best[k] = min(best.get(k, t), t)
            ref = ws[kernels[0]].linear(x)
            gemm_rows.append({"gemm": name, "K": K, "N": N, "rows": M, "us": {k: 1e6 * v for k, v in best.items()},
                              "gop_s": {k: 2 * M * K * N / v / 1e9 for k, v in best.items()},
                              "bit_equal": all(torch.equal(w.linear(x), ref) for w in ws.values())})

    # ---- whole model
    bss = [int(v) for v in args.batch_sizes.split(",")]
    feeds, n = dev_feeds(args.checkpoint, args.data, args.task, bss)
    items = {bs: [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds[bs]] for bs in bss}
    equal = True
    for bs in bss:  # warm-up pass of every kernel (oneDNN generates its kernels on first use), and the bit-equality check
        for b in items[bs]:
            outs = [m.logits(b) for m in models.values()]
            kept = [m.last_kept_tokens for m in models.values()]
            equal &= all(torch.equal(o, outs[0]) for o in outs) and all(torch.equal(t, kept[0]) for t in kept)
    per_round = {k: {bs: [] for bs in bss} for k in kernels}
    for _ in range(args.rounds):
        for k, m in models.items():
            for bs in bss:
                m.encoder.phase_profile(True)
                t0 = time.perf_counter()
                for b in items[bs]:
                    m.logits(b)
                wall = time.perf_counter() - t0
                prof = m.encoder.phase_profile(True)
                per_round[k][bs].append({"wall": wall / n, "gemm": sum(prof[ph] for ph in GEMM_PHASES) / n})
    model_rows = {bs: {k: {"ms_per_example": 1e3 * statistics.median(r["wall"] for r in per_round[k][bs]),
                           "gemm_ms_per_example": 1e3 * statistics.median(r["gemm"] for r in per_round[k][bs]),
                           "ms_per_example_rounds": [1e3 * r["wall"] for r in per_round[k][bs]]} for k in kernels} for bs in bss}
    peak = ext.vnni_peak_gops(args.threads)  # this CPU's register-only AVX-512 VNNI roofline, what the GOP/s are a fraction of
    env = environment_block(args.threads, load0)
    out = {"vnni_peak_gops": peak, "command": "python benchmarks/fused_gemm_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "checkpoint": str(args.checkpoint), "task": args.task, "threads": args.threads, "rounds": args.rounds, "calls": args.calls,
           "kernels": kernels, "kernel_paths": {k: m.kernel_path() for k, m in models.items()},
           "brgemm_uses_amx": fused_encoder.brgemm_uses_amx() if "onednn_brgemm" in kernels else None,
           "gemms": gemm_rows, "model": {str(bs): v for bs, v in model_rows.items()}, "model_bit_equal": bool(equal),
           "dev_examples": n, "environment": env}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / f"{args.name}.json", out)
    base, others = kernels[0], kernels[1:]
    lines = [f"# Fused runtime: int8 GEMM kernels side by side ({args.task}, {args.threads} threads)", "",
             f"command: `{out['command']}`", "", f"environment: {environment_summary(env)}", ""]
    lines += [f"- `{k}`: {p_}" for k, p_ in out["kernel_paths"].items()]
    lines += ["", f"This CPU's register-only AVX-512 VNNI roofline on {args.threads} threads (`vnni_peak_gops`): **{peak:.0f} GOP/s**.",
              "", f"GEMMs: the checkpoint's shapes (K x N), one weight called again and again (in cache), µs per call, fastest of "
              f"{args.rounds} interleaved rounds of {args.calls} calls; ratio = {base} time / other time (> 1: the other is faster).", "",
              "| GEMM | K x N | rows | " + " | ".join(f"{k} µs" for k in kernels) + " | " +
              " | ".join(f"{base} / {k}" for k in others) + " | " + " | ".join(f"{k} GOP/s" for k in kernels) + " | bit-equal |",
              "|---|---|---|" + "---|" * (2 * len(kernels) + len(others) + 1)]
    for r in gemm_rows:
        lines.append(f"| {r['gemm']} | {r['K']} x {r['N']} | {r['rows']} | " + " | ".join(f"{r['us'][k]:.1f}" for k in kernels) + " | " +
                     " | ".join(f"{r['us'][base] / r['us'][k]:.2f}x" for k in others) + " | " +
                     " | ".join(f"{r['gop_s'][k]:.0f}" for k in kernels) + f" | {'yes' if r['bit_equal'] else '**no**'} |")
    lines += ["", f"Model: `{args.checkpoint}` on {n} dev examples, length-bucketed batches, one call of {args.threads} threads per "
              f"batch; ms per example, median of {args.rounds} interleaved rounds (GEMM: the qkv + out + ffn phases by the "
              f"extension's clock). Logits and kept tokens bit-equal across the kernels on every batch: "
              f"**{'yes' if equal else 'NO'}**.", "",
              "| bs | " + " | ".join(f"{k} ms/ex (GEMM)" for k in kernels) + " | " + " | ".join(f"{base} / {k}" for k in others) + " |",
              "|---|" + "---|" * (len(kernels) + len(others))]
    for bs in bss:
        row = model_rows[bs]
        lines.append(f"| {bs} | " + " | ".join(f"{row[k]['ms_per_example']:.3f} ({row[k]['gemm_ms_per_example']:.3f})" for k in kernels) +
                     " | " + " | ".join(f"{row[base]['ms_per_example'] / row[k]['ms_per_example']:.2f}x" for k in others) + " |")
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
