"""Which machine made a result: the one `environment` block every benchmark writer stores.

`environment_block(threads, loadavg_start)` is written by `ltp-compress bench` (pipeline/bench.py),
`ltp-compress sweep` (sweep.json), the runner (environment.json, hence report.json) and every
script in benchmarks/ that writes JSON. It names the CPU (/proc/cpuinfo "model name", and `cpu_id`: vendor,
family, model and stepping, since a hypervisor may show two CPU generations under one name), the ISA flags
that decide which INT8 kernel runs (`ISA_FLAGS`), what oneDNN really dispatches (`onednn_probe`: a
tiny int8 linear through the project's `kernels.int8_linear` in a subprocess with ONEDNN_VERBOSE=1;
its `isa:` info line and the primitive implementation that ran, e.g. ``brg_matmul:avx512_core_vnni``
or ``brg_matmul:avx10_1_512_amx``), an ONEDNN_MAX_CPU_ISA cap set in the environment, the runtime
versions (None: not installed), the code that measured (`code_revision`: the git commit of this checkout and
whether tracked code differs from it, result files and docs aside; None outside a git checkout), the threads used, ``os.cpu_count()`` and the load average at the
start and end of the measurement. `environment_summary` is its one-line Markdown form.

Tables that merge result files check with `check_same_isa` that every file was measured with the same
ISA flags and oneDNN ISA; a speed table refuses a file without an environment block.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from ltp_compress.errors import UserError

ENVIRONMENT_FORMAT = "ltp-compress-environment"
ENVIRONMENT_VERSION = 1
#: the CPU flags that decide which INT8 kernel runs (AMX > AVX512-VNNI / AVX-VNNI > AVX2)
ISA_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile")
#: distributions whose installed version the block records (None: not installed)
VERSIONED = ("torch", "onnxruntime", "openvino", "onnx", "transformers", "neural-compressor", "torchao", "nncf")
#: every key of the block, in order
ENVIRONMENT_KEYS = ("format", "version", "cpu_model", "cpu_id", "machine", "python", "isa_flags", "onednn_max_cpu_isa", "onednn",
                    "versions", "code_revision", "threads", "cpu_count", "loadavg_start", "loadavg_end")
#: the fields of a block that must agree for two results to share a table (cpu_id: speed tables only)
ISA_SIGNATURE = ("isa_flags", "onednn_isa", "onednn_implementation", "cpu_id")
#: the /proc/cpuinfo fields of `cpu_id`
CPU_ID_FIELDS = ("vendor_id", "cpu family", "model", "stepping")
#: the CPU flags that choose which kernel computes a number (AMX tiles or AVX-512 VNNI): what accuracy tables
#: compare besides oneDNN's ISA and implementation. A flag no kernel here dispatches on (e.g. avx_vnni, the
#: 256-bit VEX form, beside AVX-512 VNNI) changes speed tables only.
KERNEL_FLAGS = ("avx512_vnni", "amx_int8", "amx_bf16", "amx_tile")
ONEDNN_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
PROBE_TIMEOUT_S = 120.0

# run by `onednn_probe` in a fresh interpreter: one tiny int8 linear on the chosen backend
_PROBE_SCRIPT = """
import sys, torch
from ltp_compress import kernels as K
backend = K.resolve_backend(sys.argv[1], "cpu")
g = torch.Generator().manual_seed(0)
w_q, w_scale = K.quantize_per_channel_symmetric(torch.randn(64, 128, generator=g), qmax=K.weight_qmax(backend))
K.int8_linear(torch.randn(16, 128, generator=g), 0.05, K.pack_weight(w_q, w_scale, None, backend))
print("LTP_PROBE_BACKEND=" + backend, flush=True)
"""


class EnvironmentMismatch(UserError, ValueError):
    """Result files measured on different ISAs (or without an environment block) merged into one table."""


def _first_cpu_fields() -> dict[str, str]:
    """The "key: value" fields of the first CPU's block of /proc/cpuinfo ({} where unreadable)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if found:
                        break  # end of the first CPU's block
                    continue
                key, _, value = line.partition(":")
                found.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return found


def cpu_model_name() -> str | None:
    """The "model name" of the first CPU in /proc/cpuinfo (None: unreadable). Its flags: `kernels.cpu_isa()`."""
    return _first_cpu_fields().get("model name")


def cpu_id() -> str | None:
    """'<vendor> family <f> model <m> stepping <s>' of the first CPU in /proc/cpuinfo (None: unreadable):
    what tells two CPUs of one "model name" apart (e.g. two AMD EPYC generations under a hypervisor)."""
    found = {k: v for k, v in _first_cpu_fields().items() if k in CPU_ID_FIELDS}
    if not found:
        return None
    return (f"{found.get('vendor_id', '?')} family {found.get('cpu family', '?')} model {found.get('model', '?')} "
            f"stepping {found.get('stepping', '?')}")


def onednn_cap() -> str | None:
    """The ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) cap set for this process, upper-cased (None: none)."""
    return next((os.environ[v].upper() for v in ONEDNN_CAP_VARIABLES if os.environ.get(v)), None)


def isa_flags() -> dict[str, bool]:
    """`ISA_FLAGS` -> bool, from `kernels.cpu_isa()` (the one reader of the CPU flags), with an
    ONEDNN_MAX_CPU_ISA cap applied (oneDNN honours it)."""
    from ltp_compress.kernels import cpu_isa

    isa = cpu_isa()
    return {k: bool(isa[k]) for k in ISA_FLAGS}


def parse_onednn_verbose(text: str) -> dict:
    """{"onednn_version", "isa", "primitive", "implementation"} from ONEDNN_VERBOSE=1 output: the
    ``info,cpu,isa:...`` line and the first executed compute primitive (reorders skipped)."""
    out = {"onednn_version": None, "isa": None, "primitive": None, "implementation": None}
    for line in text.splitlines():
        if not line.startswith(("onednn_verbose", "dnnl_verbose")):
            continue
        fields = line.split(",")
        if "info" in fields:
            rest = fields[fields.index("info") + 1:]
            if rest and rest[0].startswith("oneDNN v") and out["onednn_version"] is None:
                out["onednn_version"] = rest[0].split(" ")[1]
            if len(rest) >= 2 and rest[0] == "cpu" and rest[1].startswith("isa:") and out["isa"] is None:
                out["isa"] = ",".join(rest[1:])[len("isa:"):].strip()
        elif "exec" in fields and out["implementation"] is None:
            rest = fields[fields.index("exec") + 1:]
            if len(rest) >= 3 and rest[0] == "cpu" and rest[1] != "reorder":
                # oneDNN's gemm API (torch._int_mm) names no implementation: the API stands for it
                out["primitive"], out["implementation"] = rest[1], rest[2] or rest[1]
    return out


@functools.lru_cache(maxsize=None)
def _probe(backend: str, cap: str | None, timeout_s: float) -> tuple:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    result = {"backend": None, "onednn_version": None, "isa": None, "primitive": None, "implementation": None,
              "max_cpu_isa": cap, "error": None}
    try:
        p = subprocess.run([sys.executable, "-c", _PROBE_SCRIPT, backend], env=env, capture_output=True, text=True,
                           timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        result["error"] = f"probe did not run: {type(e).__name__}: {e}"
        return tuple(result.items())
    result.update(parse_onednn_verbose(p.stdout))
    ran = [ln for ln in p.stdout.splitlines() if ln.startswith("LTP_PROBE_BACKEND=")]
    result["backend"] = ran[-1].split("=", 1)[1] if ran else None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        result["error"] = f"probe exited with code {p.returncode}: {tail}"
    elif result["implementation"] is None:
        result["error"] = f"no oneDNN compute primitive ran (backend {result['backend']})"
    return tuple(result.items())


def onednn_probe(backend: str = "auto", timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """What oneDNN dispatches for one int8 linear on `backend` ('auto': the backend our runtime picks):
    {"backend", "onednn_version", "isa", "primitive", "implementation", "max_cpu_isa", "error"}. Runs a
    subprocess once per (backend, cap) and process; never raises (a failure is named in "error")."""
    return dict(_probe(backend, onednn_cap(), float(timeout_s)))


def loadavg() -> list[float] | None:
    """os.getloadavg() (1, 5, 15 min), rounded; None where the platform has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


#: the checkout whose commit `code_revision` reads (this file is <root>/pipeline/environment.py)
REPO_ROOT = Path(__file__).resolve().parents[1]


#: what `code_revision`'s local_changes ignores: result files and prose (a benchmark rewrites tracked result files,
#: and a doc edit changes no number), as git pathspecs
NOT_CODE = (":(exclude)benchmarks/results", ":(exclude)docs", ":(exclude)*.md")


def code_revision(root=None) -> dict | None:
    """{"commit": HEAD's sha, "local_changes": whether tracked files other than results and docs (`NOT_CODE`)
    differ from it} of the git checkout at `root` (default REPO_ROOT), or None where it is not one or git is
    missing: which code made a result, so a result file older than a change to the code it timed can be told apart."""
    root = Path(REPO_ROOT if root is None else root).resolve()
    git = ["git", "-C", str(root)]
    try:
        top_head = subprocess.run([*git, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=10)
        lines = top_head.stdout.splitlines()
        if top_head.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return None  # not a checkout, no commit yet, or a folder inside another project's checkout
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": lines[1], "local_changes": bool(status.stdout.strip())}


def environment_block(threads: int | None, loadavg_start: list[float] | None) -> dict:
    """The environment of a measurement that started with load average `loadavg_start` (`loadavg()`
    taken then) and ends now, with `threads` threads (see the module docstring; keys `ENVIRONMENT_KEYS`)."""
    env = {"format": ENVIRONMENT_FORMAT, "version": ENVIRONMENT_VERSION, "cpu_model": cpu_model_name()
           or platform.processor() or None, "cpu_id": cpu_id(), "machine": platform.machine(), "python": platform.python_version()}
    try:
        env["isa_flags"] = isa_flags()
    except Exception as e:  # never crash a benchmark over its bookkeeping
        env["isa_flags"] = {k: False for k in ISA_FLAGS}
        env["isa_flags_error"] = f"{type(e).__name__}: {e}"
    env["onednn_max_cpu_isa"] = onednn_cap()
    env["onednn"] = onednn_probe()
    env["versions"] = {d: _version(d) for d in VERSIONED}
    env["code_revision"] = code_revision()
    env.update(threads=threads, cpu_count=os.cpu_count(), loadavg_start=loadavg_start, loadavg_end=loadavg())
    return env


def _amx(env: dict) -> bool:
    return any(v for k, v in (env.get("isa_flags") or {}).items() if k.startswith("amx"))


def environment_summary(env: dict | None) -> str:
    """One Markdown line: CPU model, AMX yes/no, oneDNN ISA and implementation, threads, load average."""
    if not env:
        return "environment: not recorded"
    dnn = env.get("onednn") or {}
    dnn_s = f"{dnn.get('implementation')} ({dnn.get('isa')})" if dnn.get("implementation") else f"unknown ({dnn.get('error')})"
    cap = f", ONEDNN_MAX_CPU_ISA={env['onednn_max_cpu_isa']}" if env.get("onednn_max_cpu_isa") else ""

    def one(load):
        return "-" if not load else f"{load[0]:.2f}"

    cid = f" ({env['cpu_id']})" if env.get("cpu_id") else ""
    rev = env.get("code_revision")
    code = f", code {rev['commit'][:12]}{' + local changes' if rev.get('local_changes') else ''}" if rev else ""
    return (f"environment: CPU {env.get('cpu_model')}{cid}, AMX {'yes' if _amx(env) else 'no'}, oneDNN {dnn_s}{cap}, "
            f"{env.get('threads') or 'default'} threads of {env.get('cpu_count')} CPUs, load average (1 min) "
            f"{one(env.get('loadavg_start'))} at start / {one(env.get('loadavg_end'))} at end{code}")


def isa_signature(env: dict, *, speed: bool = True) -> dict:
    """The fields of `env` that must agree for two results to share a table (`ISA_SIGNATURE`); for accuracy
    (`speed=False`) only the flags that pick a kernel (`KERNEL_FLAGS`), and not the CPU's identity: the numbers
    follow the kernel that ran. A block without `cpu_id` (written before it was recorded) has None there."""
    dnn = env.get("onednn") or {}
    flags = env.get("isa_flags") or {}
    if not speed:
        flags = {k: flags.get(k) for k in KERNEL_FLAGS}
    return {"isa_flags": dict(sorted(flags.items())), "onednn_isa": dnn.get("isa"),
            "onednn_implementation": dnn.get("implementation"), "cpu_id": env.get("cpu_id") if speed else None}


def check_same_isa(environments: Mapping[str, dict | None], *, speed: bool) -> None:
    """Refuse to merge results measured on different ISAs (for accuracy, `speed=False`: on different kernels,
    see isa_signature). `environments`: {file name: its environment block, None where it has none}. A file without a block is refused when `speed` (its figures cannot be
    placed) and skipped otherwise (accuracy does not depend on timing). Raises EnvironmentMismatch
    naming both files."""
    seen: tuple[str, dict] | None = None
    for name, env in environments.items():
        if not env:
            if speed:
                raise EnvironmentMismatch(f"{name}: no environment block (it predates CPU / ISA recording); "
                                          "re-measure it with this version before merging its speed figures")
            continue
        sig = isa_signature(env, speed=speed)
        if seen is None:
            seen = (name, sig)
        elif sig != seen[1]:
            diff = [k for k in ISA_SIGNATURE if sig[k] != seen[1][k]]
            raise EnvironmentMismatch(
                f"{seen[0]} and {name} were measured on different ISAs ({', '.join(diff)}: "
                + "; ".join(f"{k} {seen[1][k]} vs {sig[k]}" for k in diff)
                + "); figures from two ISAs cannot share one table: re-measure one of them on the other's machine")
