"""Which runtime runs a deployed folder: the runtimes, and the one table `runtime="auto"` follows.

The table is keyed on what the folder holds and on what the CPU supports (its /proc/cpuinfo flags,
read through `ltp_compress.kernels.cpu_isa`); nothing is timed and nothing is probed at import. The
choice and the row that made it are reported on the loaded model (`.runtime`, `.runtime_choice`),
and a row that could not be followed (the fused extension does not build here, or the checkpoint
has a part the fused runtime refuses) is reported on stderr with its reason, never silently.

Why this order (the end-to-end benchmark, `benchmarks/results/e2e_bench_mrpc.md` and
`e2e_bench_sst2.md`, AMD EPYC with AVX-512 VNNI, no AMX): the fused runtime
(`ltp_int8_fused`) ran faster than our ONNX graph on ONNX Runtime (`ltp_int8_ort`) and than the
torch packed runtime (`ltp_int8`) at batch sizes 1, 8 and 32 on both tasks. An ONNX export folder
runs on ONNX Runtime: the export is the portable form, and it holds no safetensors weights for the
other runtimes.

The fused runtime's int8 GEMM kernel comes from a second table, FUSED_GEMM_TABLE, keyed on the
CPU's flags the same way: oneDNN's brgemm ukernel (AMX tiles) where the CPU has amx_int8, the
hand-written AVX-512 VNNI kernel otherwise. Its evidence is in each row (`why`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

#: every runtime a folder can be loaded on ("auto": by AUTO_TABLE)
RUNTIMES = ("auto", "torch", "onnxruntime", "fused")


@dataclass(frozen=True)
class AutoRule:
    """One row of the table: a folder of `folder` on a CPU with `cpu` runs on `runtime`."""

    folder: str
    cpu: str
    runtime: str


#: `runtime="auto"`, first matching row wins
AUTO_TABLE = (
    AutoRule("ONNX export (model.onnx)", "any x86-64", "onnxruntime"),
    AutoRule("deployable checkpoint (model.safetensors), backend 'auto'", "AVX-512 VNNI (avx512_vnni, avx512bw), AMX or not",
             "fused"),
    AutoRule("deployable checkpoint", "any other, or an explicit torch backend, or a fused row not followed", "torch"),
)


@dataclass(frozen=True)
class FusedGemmRule:
    """One row of FUSED_GEMM_TABLE: on a CPU with every flag of `flags` (ltp_compress.kernels.cpu_isa
    keys) the fused runtime's int8 GEMMs run `kernel` (ltp_compress.kernels.fused_encoder.GEMM_KERNELS)."""

    flags: tuple[str, ...]
    cpu: str
    kernel: str
    why: str


#: the fused runtime's GEMM kernel when none is given, first matching row wins (no row: the fused
#: runtime is not the auto choice, AUTO_TABLE's AVX-512 VNNI condition)
FUSED_GEMM_TABLE = (
    FusedGemmRule(("amx_int8", "avx512_vnni", "avx512"), "AMX (amx_int8) with AVX-512 VNNI", "onednn_brgemm",
                  "AMX tiles: the only kernel here that uses them (oneDNN generates tdpbusd code for the CPU); bit-equal to "
                  "avx512_vnni (tests/test_fused_runtime.py); not yet timed on an AMX CPU (benchmarks/fused_gemm_kernels.py "
                  "measures both kernels where it runs)"),
    FusedGemmRule(("avx512_vnni", "avx512"), "AVX-512 VNNI without AMX", "avx512_vnni",
                  "faster than onednn_brgemm (oneDNN's AVX-512 VNNI code) on an AVX-512 VNNI CPU without AMX: "
                  "benchmarks/results/fused_gemm_kernels_sst2.md"),
)


def fused_gemm_rules() -> list[FusedGemmRule]:
    """The FUSED_GEMM_TABLE rows whose flags this CPU has (its /proc/cpuinfo flags), in table order."""
    from ltp_compress.kernels import cpu_isa

    isa = cpu_isa()
    return [rule for rule in FUSED_GEMM_TABLE if all(isa.get(f) for f in rule.flags)]


def fused_gemm_rule() -> FusedGemmRule | None:
    """The first FUSED_GEMM_TABLE row for this CPU, None where no row matches (`runtime="auto"` passes over a
    row whose kernel cannot run here, saying why, to the next one)."""
    rules = fused_gemm_rules()
    return rules[0] if rules else None


def auto_table_markdown() -> str:
    """AUTO_TABLE as a Markdown table (docs/export.md shows it)."""
    rows = ["| folder | CPU | runtime |", "|---|---|---|"]
    rows += [f"| {r.folder} | {r.cpu} | {r.runtime} |" for r in AUTO_TABLE]
    return "\n".join(rows)


def fused_gemm_table_markdown() -> str:
    """FUSED_GEMM_TABLE as a Markdown table (docs/export.md shows it)."""
    rows = ["| CPU (fused runtime) | int8 GEMM kernel | why |", "|---|---|---|"]
    rows += [f"| {r.cpu} | {r.kernel} | {r.why} |" for r in FUSED_GEMM_TABLE]
    return "\n".join(rows)


def check_runtime(runtime: str) -> str:
    from ltp_compress.modeling.export_format import ExportError

    if runtime not in RUNTIMES:
        raise ExportError(f"runtime {runtime!r} not supported (choose from {RUNTIMES})")
    return runtime


def auto_rule(path: str | Path, backend: str = "auto") -> AutoRule:
    """The AUTO_TABLE row for folder `path` on this CPU, before the fused row is tried (the
    extension's build and the checkpoint's support are checked by `load_model`)."""
    from ltp_compress.modeling.onnx_export import ONNX_FILE

    if (Path(path) / ONNX_FILE).is_file():
        return AUTO_TABLE[0]
    from ltp_compress.kernels import cpu_isa

    isa = cpu_isa()
    if backend == "auto" and isa["avx512_vnni"] and isa["avx512"]:
        return AUTO_TABLE[1]
    return AUTO_TABLE[2]


def load_model(path: str | Path, runtime: str = "auto", threads: int | None = None, backend: str = "auto", streams: int = 1):
    """A deployed model from `path` on `runtime` (see `ltp_compress.load`); the result has `predict`,
    `logits`, `logits_many`, `last_kept_tokens`, `runtime`, `backend` and `runtime_choice` (the
    AUTO_TABLE row and what happened to it, or "requested")."""
    from ltp_compress.errors import CheckpointError, SettingError

    check_runtime(runtime)
    choice = "requested"
    if runtime == "auto":
        rule = auto_rule(path, backend)
        runtime, choice = rule.runtime, f"auto: {rule.folder} on {rule.cpu} -> {rule.runtime}"
        if runtime == "fused":
            from ltp_compress.kernels import fused_encoder
            from ltp_compress.modeling.deploy import load_deployable
            from ltp_compress.modeling.fused_runtime import FusedDeployedModel

            deployed = load_deployable(path, backend="reference")  # a broken folder is an error on any runtime, before any build
            # the first FUSED_GEMM_TABLE row for this CPU whose kernel runs here; a row passed over is said, with its reason
            reason, kernel = "no FUSED_GEMM_TABLE row matches this CPU", None
            for gemm in fused_gemm_rules():
                why_not = fused_encoder.gemm_kernel_unavailable_reason(gemm.kernel)
                if why_not is None:
                    kernel, reason = gemm.kernel, None
                    choice += f" (int8 GEMM kernel {kernel}: {gemm.cpu})"
                    break
                choice += f" (int8 GEMM kernel {gemm.kernel} not used: {why_not})"
                print(f"ltp_compress.load({path}): the fused runtime's {gemm.kernel} kernel is not used: {why_not}", file=sys.stderr)
                reason = why_not
            if reason is None:
                try:
                    model = FusedDeployedModel(deployed, kernel=kernel, threads=threads, streams=streams)
                    model.runtime_choice = choice
                    return model
                except CheckpointError as e:  # a part the fused runtime refuses: the torch row
                    reason = str(e)
            runtime = "torch"
            choice += f"; not followed ({reason}) -> torch"
            print(f"ltp_compress.load({path}): the fused runtime is not used: {reason}; running on torch", file=sys.stderr)
    if runtime == "onnxruntime":
        from ltp_compress.modeling.onnx_runtime import load_onnx

        model = load_onnx(path, threads=threads, streams=streams)
    elif runtime == "fused":
        from ltp_compress.modeling.fused_runtime import load_fused

        model = load_fused(path, threads=threads, streams=streams)
    else:
        if streams != 1:
            raise SettingError(f"streams={streams!r}: concurrent streams are an onnxruntime / fused setting "
                               "(the torch runtime runs one batch at a time)")
        from ltp_compress.modeling.deploy import load_deployable

        if threads is not None:
            import torch

            torch.set_num_threads(int(threads))  # process-wide
        model = load_deployable(path, backend=backend)
    model.runtime_choice = choice
    return model
