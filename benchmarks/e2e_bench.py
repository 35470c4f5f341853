"""End-to-end inference benchmark: ours (LTP FP32, dense INT8, LTP INT8 on torch; dense INT8 and LTP
INT8 exported to ONNX on ONNX Runtime) against what users deploy: HF FP32 (sdpa: the baseline;
eager), torch.ao dynamic INT8, Neural Compressor PT2E static INT8, torchao static INT8, ONNX Runtime
FP32 (transformer optimizer) / INT8 dynamic / INT8 static (QDQ), OpenVINO FP32 / INT8 (NNCF), all on
the same pre-tokenised dev batches. Thin wrapper around `ltp_compress.pipeline.bench.run_benchmark`
(systems: `pipeline/peers/`).

    python benchmarks/e2e_bench.py runs/sst2_minilm --data ../shared/data/glue/SST-2 \
        --task sst2 --threads 2 --batch-sizes 1,8,32 --rounds 5

(the same arguments as `ltp-compress bench`, defined once in `pipeline/bench_args.py`).

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
