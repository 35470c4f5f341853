"""INT8 vs FP32/BF16 GEMM microbenchmark at BERT linear-layer shapes (not a test).

For each (M, K, N) it times, with ``torch.set_num_threads(--threads)``, warmup + median:
  * ``<backend>``        full ``int8_linear`` (quantise fp32 x -> int8 GEMM -> dequant + bias)
  * ``<backend>:gemm``   the raw int8 GEMM where separable: oneDNN qlinear on a pre-quantised
                         uint8 input (its dequant/bias epilogue is fused in the kernel and
                         cannot be split off), ``torch._int_mm`` int32 output for cpu_int_mm
  * ``fp32``             ``F.linear`` fp32 with bias;  ``bf16``: ``F.linear`` in bfloat16
GOP/s = 2*M*K*N / median seconds. ``frac_best_int8`` = rate / best full-int8 rate at that shape.
The report names, per backend, the oneDNN implementation that ran (e.g. ``brg_matmul:avx512_core_vnni``
or ``brg_matmul:avx10_1_512_amx``: VNNI vs AMX), from a verbose probe (pipeline/environment.py).

Writes <out-dir>/gemm_bench.json and gemm_bench.md.

    python benchmarks/gemm_bench.py [--threads 2] [--quick] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ltp_compress import kernels as K
from ltp_compress.fileio import atomic_write_text
from ltp_compress.pipeline.environment import environment_block, environment_summary, loadavg, onednn_probe

MS = (128, 1024, 4096)
KNS = ((384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768))
QUICK_MS = (128, 1024)
QUICK_KNS = ((384, 1536), (1536, 384), (768, 3072))
INT8_BACKENDS = ("cpu_vnni", "cpu_avx2", "cpu_int_mm", "cuda")


def _time(fn, device: torch.device, min_reps: int = 5, max_reps: int = 30, budget_s: float = 0.6) -> float:
    """Median wall time of fn() in seconds after warmup; repeats adapt to a time budget."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(m: int, k: int, n: int, device: torch.device, backends: list[str]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device)  # [M, K]
    w = (torch.randn(n, k, generator=g) * 0.05).to(device)  # [N, K]
    b = torch.randn(n, generator=g).to(device)  # [N]
    x_scale = float(x.abs().max()) / 127
    flops = 2.0 * m * k * n
    rows = []

    def add(name, kind, fn):
        t = _time(fn, device)
        rows.append({"M": m, "K": k, "N": n, "impl": name, "kind": kind, "ms": t * 1e3, "gops": flops / t / 1e9})

    with torch.inference_mode():
        for be in backends:
            w_q, w_scale = K.quantize_per_channel_symmetric(w, qmax=K.weight_qmax(be))
            packed = K.pack_weight(w_q, w_scale, b, be)
            add(be, "int8_linear", lambda: K.int8_linear(x, x_scale, packed))
            if be in ("cpu_vnni", "cpu_avx2"):
                x_u8 = K.quantize_u8_zp128(x, x_scale)
                add(f"{be}:gemm", "int8_gemm", lambda: K.onednn_qlinear_u8(x_u8, x_scale, packed))
            elif be == "cpu_int_mm":
                x_q = K.quantize_per_tensor_symmetric(x, x_scale)
                add(f"{be}:gemm", "int8_gemm", lambda: torch._int_mm(x_q, packed.packed))
            elif be == "cuda":
                x_q = K.quantize_per_tensor_symmetric(x, x_scale)
                add(f"{be}:gemm", "int8_gemm", lambda: torch._int_mm(x_q, packed.packed.t()))
        add("fp32", "float", lambda: F.linear(x, w, b))
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        add("bf16", "float", lambda: F.linear(xb, wb, bb))

    best = max((r["gops"] for r in rows if r["kind"] == "int8_linear"), default=float("nan"))
    for r in rows:
        r["frac_best_int8"] = r["gops"] / best
    return rows


def kernel_paths(backends: list[str]) -> dict[str, dict]:
    """{backend: what oneDNN ran for it}: the verbose probe's implementation (None: not a oneDNN backend)."""
    return {be: onednn_probe(be) for be in backends if be != "cuda"}


def to_markdown(meta: dict, env: dict, rows: list[dict]) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    paths = meta.get("kernel_paths") or {}
    out = [
        "# INT8 GEMM microbenchmark",
        "",
        f"- device: {meta['device']}, torch {env['versions']['torch']}",
        f"- {environment_summary(env)} (other processes on a 2-core machine distort timings)",
        "- kernel that ran per backend: " + (", ".join(
            f"`{be}`: {p['implementation'] or 'not oneDNN'}" + (f" ({p['error']})" if p.get("error") else "")
            for be, p in paths.items()) or "-"),
        "- GOP/s = 2·M·K·N / median time. `<backend>` = full int8_linear (quantise + GEMM + dequant/bias);",
        "  `<backend>:gemm` = int8 GEMM alone on pre-quantised input (oneDNN: dequant/bias fused in kernel).",
        "- `(xN)` = fraction of the best full-int8_linear rate at that shape.",
        "",
        "| M | K | N | " + " | ".join(impls) + " |",
        "|---|---|---|" + "---|" * len(impls),
    ]
    shapes = list(dict.fromkeys((r["M"], r["K"], r["N"]) for r in rows))
    for s in shapes:
        by = {r["impl"]: r for r in rows if (r["M"], r["K"], r["N"]) == s}
        cells = [f"{by[i]['gops']:.0f} ({by[i]['frac_best_int8']:.2f})" if i in by else "-" for i in impls]
        out.append(f"| {s[0]} | {s[1]} | {s[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help=f"M in {QUICK_MS}, (K,N) in {QUICK_KNS}")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="*", default=None, help="int8 backends (default: all available)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = args.backends or [b for b in INT8_BACKENDS if K.backend_unavailable_reason(b, device) is None]
    ms, kns = (QUICK_MS, QUICK_KNS) if args.quick else (MS, KNS)
    load0 = loadavg()
    meta = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "backends": backends,
        "kernel_paths": kernel_paths(backends),
        "quick": args.quick,
    }
    rows = []
    for m in ms:
        for k, n in kns:
            shape_rows = bench_shape(m, k, n, device, backends)
            rows += shape_rows
            print(f"M={m:5d} K={k:5d} N={n:5d}  " + "  ".join(f"{r['impl']}={r['gops']:.0f}" for r in shape_rows), flush=True)

    env = environment_block(torch.get_num_threads(), load0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "gemm_bench.json", json.dumps({"meta": meta, "environment": env, "results": rows}, indent=2))
    atomic_write_text(out_dir / "gemm_bench.md", to_markdown(meta, env, rows))
    print(f"wrote {out_dir / 'gemm_bench.json'} and {out_dir / 'gemm_bench.md'}")


if __name__ == "__main__":
    main()
