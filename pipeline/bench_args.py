"""The benchmark's system names and command line, shared by `ltp-compress bench` and
benchmarks/e2e_bench.py. Light (no torch): the CLI builds its parser from it."""

from __future__ import annotations

from pathlib import Path

from ltp_compress.pipeline.arg_types import int_list

# the baseline: HF FP32 with its default attention (sdpa)
BASELINE = "hf_fp32_sdpa"
# other FP32 systems users deploy
FP32_PEERS = ("hf_fp32_eager", "ort_fp32", "openvino_fp32")
# dense systems at the precision users get by default on their CPU (bf16 where the CPU has it)
DEFAULT_PRECISION_PEERS = ("hf_bf16_sdpa", "openvino_default")
# the dense INT8 peers ("best dense INT8 peer" = the fastest of these at a batch size)
INT8_PEERS = ("torch_dynamic_int8", "inc_static_int8", "torchao_static_int8_compiled", "ort_int8_dynamic",
              "ort_int8_static", "openvino_int8")
# ours, on each runtime (torch, onnxruntime)
OURS = ("ltp_fp32", "dense_int8", "ltp_int8", "dense_int8_ort", "ltp_int8_ort", "dense_int8_fused", "ltp_int8_fused")
SYSTEMS = (BASELINE,) + FP32_PEERS + DEFAULT_PRECISION_PEERS + INT8_PEERS + OURS


def _batch_sizes(text: str) -> list[int]:
    """--batch-sizes '1,8,32' -> [1, 8, 32]."""
    return int_list(text, what="batch size", example="1,8,32", minimum=1)


def add_bench_arguments(p) -> None:
    """The benchmark's command line, shared by `ltp-compress bench` and benchmarks/e2e_bench.py."""
    p.add_argument("checkpoint", type=Path, help="run directory (teacher / hard / int8 stages found from its stages), "
                                                   "or a deployable INT8 folder (inside a run: that run's teacher and hard models too)")
    p.add_argument("--run-dir", type=Path, default=None, help="run whose teacher / hard models to use with a standalone CHECKPOINT")
    p.add_argument("--teacher", type=Path, help="override: FP teacher model folder")
    p.add_argument("--hard", type=Path, help="override: hard-pruned FP model folder")
    p.add_argument("--data", type=Path, required=True, help="GLUE-format folder with dev.tsv (train.tsv used for calibration)")
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default=[1, 8, 32], type=_batch_sizes, help="comma-separated, each >= 1 (default 1,8,32)")
    p.add_argument("--max-examples", type=int, default=None, help="seeded subset of the dev set (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per batch size and round (median)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved rounds: the whole system list runs this many times (median over rounds)")
    p.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--isolation", choices=("subprocess", "inprocess"), default="subprocess",
                   help="subprocess (default): each system in a fresh spawn child, own peak RSS")
    p.add_argument("--calibration-batches", type=int, default=16)
    p.add_argument("--backend", default="auto", help="INT8 backend for our systems")
    p.add_argument("--profile-bs", type=int, default=32, help="batch size of the ltp_int8 profile (0: no profile)")
    p.add_argument("--gemm-bench", type=Path, default=Path("benchmarks/results/gemm_bench.json"))
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep exported / quantised artifacts (ONNX files) here (default: a temporary folder, removed)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="e2e_bench")


