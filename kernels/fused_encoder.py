"""Loader of the fused pruned-encoder C++ extension (sources: kernels/fused/).

The extension runs a whole pruned INT8 BERT / RoBERTa forward in one call (the model-level driver
is ltp_compress.modeling.fused_runtime). Its int8 GEMMs (kernels/fused/int8_gemm.h) come in two
kernels, chosen explicitly per weight:

* ``avx512_vnni`` — a hand-written vpdpbusd u8 x s8 -> s32 micro-kernel (x_q + 128 as the u8
  source, int32 compensation, so the accumulators are exact), weights pre-packed once, scale /
  bias / erf-GELU epilogue in registers. It needs a CPU with AVX-512 VNNI at build and run time.
  It does not use AMX tiles, even where the CPU has them.
* ``reference`` — plain C++ int32 loops, the oracle the fast kernel is tested against.

Nothing is built or probed at import. ``build()`` compiles the extension with
``torch.utils.cpp_extension.load`` (g++ and ninja; ``-O3 -march=native -fopenmp``) into
``build/fused_encoder/<cpu tag>/`` of the repository (or ``LTP_FUSED_BUILD_DIR``), so a build
made on one CPU is never loaded on another; later calls reuse it. ``available()`` returns None
when the extension builds and loads here, else the reason (no silent fallback: the fused runtime
refuses to load without it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent / "fused"
SOURCES = ("fused_encoder.cpp",)
HEADERS = ("int8_gemm.h", "attention_ops.h")
EXTENSION_NAME = "ltp_fused_encoder"
#: int8 GEMM kernels of the extension, fastest first
GEMM_KERNELS = ("avx512_vnni", "reference")
# -fopenmp: at::parallel_for is a header template that runs serially unless the including code is
# compiled with OpenMP (ATen/Parallel-inl.h: INTRA_OP_PARALLEL comes from _OPENMP). Nothing is linked
# for it: the GOMP symbols resolve to the libgomp torch itself loads (libtorch_cpu's dependency), so
# the extension shares torch's one thread pool (and at::set_num_threads).
CFLAGS = ("-O3", "-march=native", "-fopenmp")

_module = None
_error: str | None = None


def _cpu_tag() -> str:
    """Short hash of the CPU model and flags: the build folder's name (-march=native code is per CPU)."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    text += line
                if line.startswith("flags"):
                    break
    except OSError:
        text = "unknown-cpu"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _source_hash() -> str:
    """Hash of every source and header: torch's JIT loader rebuilds when its build flags change,
    and it does not hash the headers itself."""
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update((SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def build_directory() -> Path:
    """Where the extension is built: $LTP_FUSED_BUILD_DIR, else the repository's build/ folder."""
    env = os.environ.get("LTP_FUSED_BUILD_DIR")
    root = Path(env) if env else SOURCE_DIR.parents[1] / "build" / "fused_encoder"
    return root / _cpu_tag()


#: torch's JIT loader's own lock file in the build folder (torch.utils.file_baton.FileBaton): created by the
#: process that builds, removed in a `finally`, so a builder killed by a signal leaves it behind and every
#: later load waits on it forever
TORCH_LOCK_FILE = "lock"
#: our lock beside it: an flock(2), which the OS releases when its holder dies
BUILD_LOCK_FILE = ".ltp_build.flock"


@contextlib.contextmanager
def _build_lock(folder: Path):
    """Serialise builders of `folder` on an flock (released by the OS even when a holder is killed), and
    remove torch's lock file found while holding it: every builder takes the flock before torch's lock, so a
    torch lock seen here was left by a builder that died (SIGTERM / SIGKILL skip its `finally`)."""
    with open(folder / BUILD_LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / TORCH_LOCK_FILE
            if stale.exists():
                stale.unlink()
                print(f"fused encoder extension: removed {stale}, a build lock left by a build process that died",
                      file=sys.stderr)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(verbose: bool = False):
    """Compile (or reuse the cached build of) the extension and return the loaded module. Raises
    RuntimeError with the compiler's message when it cannot be built here."""
    global _module, _error
    if _module is not None:
        return _module
    try:
        from torch.utils.cpp_extension import load
    except ImportError as e:  # pragma: no cover
        _error = f"torch.utils.cpp_extension unavailable: {e}"
        raise RuntimeError(_error) from e
    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    venv_bin = str(Path(sys.executable).parent)  # the fused extra's pip ninja lives beside the interpreter
    if shutil.which("ninja") is None and (Path(venv_bin) / "ninja").exists():
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    try:
        with _build_lock(folder):
            _module = load(name=EXTENSION_NAME, sources=[str(SOURCE_DIR / s) for s in SOURCES],
                           extra_include_paths=[str(SOURCE_DIR)], extra_cflags=[*CFLAGS, f"-DLTP_SOURCE_HASH={_source_hash()}"],
                           build_directory=str(folder), verbose=verbose)
    except Exception as e:  # compiler missing, ninja missing, compile error: say what happened
        _error = f"building the fused encoder extension failed ({type(e).__name__}): {str(e)[-2000:]}"
        raise RuntimeError(_error) from e
    _error = None
    return _module


def available() -> str | None:
    """None if the extension builds (or is built) and loads here, else why not. Builds on first call."""
    if _module is not None:
        return None
    try:
        build()
    except RuntimeError as e:
        return str(e)
    return None


def gemm_kernel_unavailable_reason(kernel: str) -> str | None:
    """None if int8 GEMM `kernel` can run here (builds the extension if needed), else why not."""
    if kernel not in GEMM_KERNELS:
        return f"unknown fused GEMM kernel {kernel!r}; choose from {GEMM_KERNELS}"
    reason = available()
    if reason is not None:
        return reason
    if kernel == "avx512_vnni":
        if not _module.vnni_compiled():
            return "the extension was built without the avx512_vnni kernel (the compiler saw no AVX-512 VNNI for -march=native)"
        if not _module.cpu_has_avx512_vnni():
            return "this CPU lacks AVX-512 VNNI (avx512_vnni + avx512bw)"
    return None


def kernel_description(kernel: str) -> str:
    """What the named GEMM kernel is (the extension's own words)."""
    return build().kernel_description(kernel)
