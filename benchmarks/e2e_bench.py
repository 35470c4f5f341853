"""End-to-end inference benchmark: HF FP32, three dense INT8 peers (torch.ao dynamic, Neural
Compressor PT2E static + compile, torchao static + compile) and ours (LTP FP32, dense INT8,
LTP INT8) on the same dev batches. Thin wrapper around `ltp_compress.pipeline.bench.run_benchmark`.

    python benchmarks/e2e_bench.py runs/sst2_minilm --data ../shared/data/glue/SST-2 \
        --task sst2 --threads 2 --batch-sizes 1,8,32

(the same arguments as `ltp-compress bench`).

Writes <out-dir>/<name>.json and .md (default benchmarks/results/e2e_bench.*). Run it on a quiet
machine: every timing is wall clock.
"""

from __future__ import annotations

import argparse
import sys

from ltp_compress.pipeline.bench import bench_cli
from ltp_compress.pipeline.bench_args import add_bench_arguments


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    return bench_cli(p.parse_args(argv), command="python " + " ".join(sys.argv))


if __name__ == "__main__":
    sys.exit(main())
