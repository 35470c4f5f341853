"""Where the fused C++ runtime's time goes (not a test): its own phase profile per batch size.

Runs a deployable INT8 checkpoint through `ltp_compress.load(..., runtime="fused")` on the task's dev
set (the same length-bucketed batches as the end-to-end benchmark), `--rounds` passes per batch
size after one warm-up pass, and reports per example: the phases the extension times itself
(`FusedEncoder.phase_profile`: embed, qkv = quantise + QKV GEMM, attention, select = keep decision
+ gather, out = output projection + LayerNorm, ffn, head), the tokens entering each layer, and the
integer GEMM work (MACs per example and the GOP/s the GEMM phases reach together).

    .venv/bin/python benchmarks/fused_phase_profile.py CHECKPOINT --data ../shared/data/glue/MRPC --task mrpc --threads 2

Writes <out-dir>/<name>.json and .md with the environment block. Timings mean something only on an
otherwise idle machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import checkpoint_bench_parser, dev_feeds, environment_block, environment_summary, loadavg  # noqa: E402

PHASES = ("embed", "qkv", "attention", "select", "out", "ffn", "head")


def gemm_macs(kept, d: int, d_ff: int) -> float:
    """Integer GEMM MACs of one forward, from the tokens entering each layer [b, L] and leaving it:
    QKV on the tokens entering (3·d·d each), output projection and FFN on the tokens kept after the
    layer's keep decision (d·d + 2·d·d_ff each; the last layer runs them on [CLS] only)."""
    import numpy as np

    k = np.asarray(kept, dtype=np.float64)  # [b, L]
    b, L = k.shape
    leaving = np.concatenate([k[:, 1:], np.ones((b, 1))], axis=1)
    return float((k * 3 * d * d).sum() + (leaving * (d * d + 2 * d * d_ff)).sum())


def main(argv=None) -> dict:
    p = checkpoint_bench_parser(__doc__.splitlines()[0], "fused_phase_profile")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    import torch

    import ltp_compress
    from ltp_compress.kernels import fused_encoder

    load0 = loadavg()
    bss = [int(x) for x in args.batch_sizes.split(",")]
    feeds, n = dev_feeds(args.checkpoint, args.data, args.task, bss)
    model = ltp_compress.load(args.checkpoint, runtime="fused", threads=args.threads)
    cfg = model.model.config
    enc = model.encoder
    rows = {}
    for bs in bss:
        batches = [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds[bs]]
        for b in batches:  # warm-up
            enc.forward(b["input_ids"], b["attention_mask"], b["token_type_ids"], args.threads)
        enc.phase_profile(True)
        macs = 0.0
        tokens = 0.0
        for _ in range(args.rounds):
            for b in batches:
                _, kept = enc.forward(b["input_ids"], b["attention_mask"], b["token_type_ids"], args.threads)
                macs += gemm_macs(kept, cfg.hidden_size, cfg.intermediate_size)
                tokens += float(kept.sum())
        prof = enc.phase_profile(True)
        calls = prof.pop("calls")
        examples = n * args.rounds
        total = sum(prof.values())
        gemm_s = prof["qkv"] + prof["out"] + prof["ffn"]
        rows[bs] = {"batches_per_round": len(batches), "calls": calls,
                    "ms_per_example": {k: 1e3 * prof[k] / examples for k in PHASES},
                    "total_ms_per_example": 1e3 * total / examples, "examples_per_s": examples / total,
                    "token_layers_per_example": tokens / examples, "gemm_macs_per_example": macs / examples,
                    "gemm_phases_gop_s": 2 * macs / gemm_s / 1e9}
    ext = fused_encoder.build()
    peak = {"threads_1": ext.vnni_peak_gops(1, 1.0), f"threads_{args.threads}": ext.vnni_peak_gops(args.threads, 1.0)}
    env = environment_block(args.threads, load0)
    out = {"command": "python benchmarks/fused_phase_profile.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "checkpoint": str(args.checkpoint), "task": args.task, "examples": n, "threads": args.threads,
           "rounds": args.rounds, "kernel_path": model.kernel_path(), "vnni_peak_gop_s": peak, "rows": rows, "environment": env}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Fused runtime: time per phase ({args.task}, {n} dev examples)", "",
             f"command: `{out['command']}`", "", f"environment: {environment_summary(env)}", "",
             f"kernel path: {out['kernel_path']}", "",
             "ms per example (the extension's own clock, summed over every batch of the dev set, "
             f"{args.rounds} rounds after a warm-up pass); GEMM GOP/s = 2 · integer-GEMM MACs / time in the qkv + out + ffn "
             "phases (which include quantising their inputs and the epilogues)", "",
             "int8 roofline of this CPU (`vnni_peak_gops`: a register-only loop of independent vpdpbusd per thread, no memory "
             "traffic): " + ", ".join(f"{k.replace('threads_', '')} thread(s) {v:.0f} GOP/s" for k, v in peak.items()), "",
             "| bs | " + " | ".join(PHASES) + " | total | ex/s | token-layers / ex | GEMM GOP/s |",
             "|---|" + "---|" * (len(PHASES) + 4)]
    for bs, r in rows.items():
        lines.append(f"| {bs} | " + " | ".join(f"{r['ms_per_example'][k]:.3f}" for k in PHASES)
                     + f" | {r['total_ms_per_example']:.3f} | {r['examples_per_s']:.0f} | {r['token_layers_per_example']:.0f}"
                     f" | {r['gemm_phases_gop_s']:.0f} |")
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
