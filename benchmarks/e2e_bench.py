"""End-to-end inference benchmark: HF FP32, three dense INT8 peers (torch.ao dynamic, Neural
Compressor PT2E static + compile, torchao static + compile) and ours (LTP FP32, dense INT8,
LTP INT8) on the same dev batches. Thin wrapper around `ltp_compress.pipeline.bench.run_benchmark`.

    python benchmarks/e2e_bench.py --run-dir runs/sst2_minilm --data ../shared/data/glue/SST-2 \
        --task sst2 --threads 2 --batch-sizes 1,8,32

Writes <out-dir>/<name>.json and .md (default benchmarks/results/e2e_bench.*). Run it on a quiet
machine: every timing is wall clock.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ltp_compress.pipeline.bench import SYSTEMS, render_markdown, run_benchmark


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, help="finished run directory (teacher / hard / int8 stages found from meta.json)")
    p.add_argument("--checkpoint", type=Path, help="deployable INT8 folder (instead of, or overriding, the run's)")
    p.add_argument("--teacher", type=Path, help="override: FP teacher model folder")
    p.add_argument("--hard", type=Path, help="override: hard-pruned FP model folder")
    p.add_argument("--data", type=Path, required=True, help="GLUE-format folder with dev.tsv (train.tsv used for calibration)")
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--max-examples", type=int, default=None, help="seeded subset of the dev set (default: all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--isolation", choices=("subprocess", "inprocess"), default="subprocess",
                   help="subprocess (default): each system in a fresh spawn child, own peak RSS")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--backend", default="auto", help="INT8 backend for our systems")
    p.add_argument("--profile-bs", type=int, default=32, help="batch size of the ltp_int8 profile (0: no profile)")
    p.add_argument("--gemm-bench", type=Path, default=Path("benchmarks/results/gemm_bench.json"))
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="e2e_bench")
    a = p.parse_args(argv)
    if a.run_dir is None and a.checkpoint is None:
        p.error("give --run-dir and/or --checkpoint")
    res = run_benchmark(a.checkpoint or a.run_dir, run_dir=a.run_dir if a.checkpoint else None,
                        teacher=a.teacher, hard=a.hard, data_dir=a.data, task=a.task, threads=a.threads,
                        batch_sizes=[int(x) for x in a.batch_sizes.split(",") if x.strip()],
                        max_examples=a.max_examples, repeats=a.repeats,
                        systems=[s.strip() for s in a.systems.split(",")] if a.systems else None,
                        isolation=a.isolation, calibration_batches=a.calibration_batches, backend=a.backend,
                        profile_bs=a.profile_bs or None, gemm_bench_json=a.gemm_bench, out_dir=a.out_dir,
                        name=a.name, command="python " + " ".join(sys.argv), log=lambda m: print(m, file=sys.stderr))
    print(render_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
