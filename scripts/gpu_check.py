"""GPU readiness check: the steps of scripts/gpu_check.sh (run that; it sets PYTHONPATH up).

The parent process uses the standard library only. Every step runs in its own child process with
its own timeout (a CUDA crash or hang in one step cannot take the others or the summary down), and
the JSON summary is rewritten atomically after every step, so a run killed from outside still
leaves what was measured. Steps:

  env          versions (python, torch + CUDA, transformers, accelerate, pydantic, ...), device
  pytest_gpu   ``pytest -m gpu tests`` (on CUDA a skipped GPU test counts as a failure)
  bf16_run     a tiny 2-layer BERT (built from a config, tests/conftest.py) on data/sst2_demo:
               finetune -> ltp_soft -> ltp_hard -> quantize (backend cuda) through
               ``accelerate launch --num_processes 1 --mixed_precision bf16 -m ltp_compress.pipeline.cli run``
  int8_correct the CUDA INT8 backend vs the exact reference at several shapes (int32 accumulators
               bit-exact; int8_linear with and without the fused GELU within the kernel tests' tolerance)
  gemm_bench   INT8 (torch._int_mm through our cuda backend: GEMM alone, and quantise+GEMM+epilogue)
               vs bf16 F.linear, M in 128/1024/4096 x (768,768), (768,3072), (3072,768), CUDA events
  model_bench  BERT-base-sized random model (12 layers, d=768): our pruned INT8 runtime (thresholds
               fitted to ~40 % relative FLOPs) vs HF bf16 dense (and fp32 dense, pruned fp32, dense
               INT8 for attribution) at bs 1 and 32, examples/s

GPU_CHECK_ALLOW_CPU=1 runs every step on CPU with tiny sizes (a dry run that catches Python errors;
its numbers mean nothing).

Children run in the scratch folder, not the repo root, with PYTHONSAFEPATH=1 (set by gpu_check.sh):
``python -m X`` would otherwise put the current folder first on sys.path, and the repo root holds
a plain ``ltp_compress/`` folder without the subpackages, which would shadow the symlink tree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "pytest_gpu", "bf16_run", "int8_correct", "gemm_bench", "model_bench")
#: per-step timeout (s) on CUDA; each is also capped by what is left of the global budget
TIMEOUTS = {"env": 60, "pytest_gpu": 90, "bf16_run": 150, "int8_correct": 60, "gemm_bench": 60, "model_bench": 100}
TAIL = 4000


def _cpu_mode() -> bool:
    return os.environ.get("GPU_CHECK_ALLOW_CPU", "0") not in ("", "0")


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _tail(text: str, n: int = TAIL) -> str:
    return text if len(text) <= n else "..." + text[-n:]


# ============================================================================= parent
def _run_child(cmd: list[str], timeout: float, cwd: Path, env: dict | None = None) -> tuple[int | None, str, float]:
    """(returncode or None on timeout, combined output, seconds). The child gets its own process
    group so a timeout kills everything it started (accelerate's workers too)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                         env=env, cwd=cwd, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=max(1.0, timeout))
        return p.returncode, out or "", time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        import signal

        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        out, _ = p.communicate()
        return None, (out or "") + f"\n[gpu_check] killed after {timeout:.0f} s", time.perf_counter() - t0


def _python_step(name: str, work: Path, timeout: float) -> dict:
    res_file = work / f"{name}.result.json"
    res_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--work", str(work), "--result", str(res_file)]
    rc, out, secs = _run_child(cmd, timeout, cwd=work)
    result = None
    if res_file.is_file():
        try:
            result = json.loads(res_file.read_text())
        except json.JSONDecodeError as e:
            out += f"\n[gpu_check] unreadable result file {res_file}: {e}"
    status = "timeout" if rc is None else ("passed" if rc == 0 else "failed")
    if status == "passed" and isinstance(result, dict) and result.get("ok") is False:
        status = "failed"
    return {"status": status, "returncode": rc, "seconds": round(secs, 2), "command": " ".join(cmd),
            "output_tail": _tail(out), "result": result}


def _pytest_step(work: Path, timeout: float) -> dict:
    junit = work / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(REPO),
           "-c", str(REPO / "pyproject.toml"), "--junitxml", str(junit), str(REPO / "tests")]
    rc, out, secs = _run_child(cmd, timeout, cwd=work)
    counts = {}
    summary_lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", ln)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b", summary_lines[-1] if summary_lines else ""):
        counts[what] = int(n)
    if rc is None:
        status = "timeout"
    elif rc != 0:
        status = "failed"
    elif counts.get("skipped") and not _cpu_mode():
        status = "failed"  # on a CUDA machine no GPU test may be skipped
    elif not counts.get("passed"):
        status = "skipped" if _cpu_mode() else "failed"
    else:
        status = "passed"
    return {"status": status, "returncode": rc, "seconds": round(secs, 2), "command": " ".join(cmd),
            "output_tail": _tail(out), "result": {"counts": counts}}


def main_parent(args) -> int:
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(os.environ.get("GPU_CHECK_CALLER_DIR") or Path.cwd())
    summary_path = out_dir / "gpu_check.json"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check."))
    work.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "285"))
    wanted = [s for s in os.environ.get("GPU_CHECK_STEPS", ",".join(STEPS)).split(",") if s]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        print(f"[gpu_check] unknown steps {unknown}; valid: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    summary = {
        "schema": 1, "ok": None, "mode": "cpu-dry-run" if _cpu_mode() else "cuda",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "finished_utc": None,
        "budget_s": budget, "host": platform.node(), "python": sys.version.split()[0],
        "repo": str(REPO), "git_head": _git_head(), "work_dir": str(work),
        "setup_log": _tail(Path(args.setup_log).read_text(errors="replace")) if args.setup_log and Path(args.setup_log).is_file() else None,
        "pythonpath": os.environ.get("PYTHONPATH"), "steps": {},
    }
    _atomic_json(summary_path, summary)
    print(f"[gpu_check] mode {summary['mode']}, budget {budget:.0f} s, summary -> {summary_path}", flush=True)
    for name in STEPS:
        if name not in wanted:
            continue
        left = budget - (time.perf_counter() - t_start)
        timeout = min(TIMEOUTS[name], left - 5)
        if timeout < 10:
            summary["steps"][name] = {"status": "not_run", "reason": f"global budget of {budget:.0f} s spent"}
            _atomic_json(summary_path, summary)
            continue
        print(f"[gpu_check] {name} (timeout {timeout:.0f} s) ...", flush=True)
        try:
            rec = _pytest_step(work, timeout) if name == "pytest_gpu" else _python_step(name, work, timeout)
        except Exception as e:  # the harness itself must never lose the summary
            rec = {"status": "error", "output_tail": f"{type(e).__name__}: {e}"}
        rec["timeout_s"] = round(timeout, 1)
        summary["steps"][name] = rec
        if name == "env" and isinstance(rec.get("result"), dict):
            summary["versions"] = rec["result"].get("versions")
            summary["device"] = rec["result"].get("device")
        _atomic_json(summary_path, summary)
        print(f"[gpu_check] {name}: {rec['status']} in {rec.get('seconds', 0):.1f} s", flush=True)
        if rec["status"] != "passed":
            print(_tail(rec.get("output_tail", ""), 1500), flush=True)
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    summary["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ran = [r for r in summary["steps"].values()]
    summary["ok"] = bool(ran) and all(r["status"] in ("passed", "skipped") for r in ran)
    summary["status_by_step"] = {k: v["status"] for k, v in summary["steps"].items()}
    _atomic_json(summary_path, summary)
    print(f"[gpu_check] done in {summary['seconds']:.0f} s: {summary['status_by_step']} -> {summary_path}", flush=True)
    return 0 if summary["ok"] else 1


def _git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


# ============================================================================= steps (children)
def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if _cpu_mode():
        return torch.device("cpu")
    raise SystemExit("no CUDA device visible (torch.cuda.is_available() is False); "
                     "set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run")


def _int8_backend(device) -> str:
    return "cuda" if device.type == "cuda" else "cpu_int_mm"


def step_env(work: Path) -> dict:
    import importlib
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for mod in ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "pydantic", "pydantic_core",
                "yaml", "tqdm", "matplotlib", "onnxruntime", "onnx", "pytest", "datasets"):
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", None) or md.version(mod)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            versions[mod] = f"missing ({type(e).__name__})"
    import torch

    try:
        import pydantic

        versions["pydantic_from"] = pydantic.__file__  # the carried wheel (PYTHONPATH) or the image's
    except ImportError:
        pass
    versions["torch_cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    dev = {"cuda_available": torch.cuda.is_available(), "count": torch.cuda.device_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
    try:
        dev["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
        dev["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    import ltp_compress
    from ltp_compress import kernels as K

    pkg = {"ltp_compress_file": ltp_compress.__file__,
           "int8_backends": K.available_backends("cuda" if torch.cuda.is_available() else "cpu")}
    need = ["torch", "transformers", "accelerate", "pydantic", "yaml", "tqdm"]
    missing = [m for m in need if str(versions.get(m, "")).startswith("missing")]
    if not torch.cuda.is_available() and not _cpu_mode():
        missing.append("cuda")
    return {"ok": not missing, "missing": missing, "versions": versions, "device": dev, "package": pkg}


def step_bf16_run(work: Path) -> dict:
    import yaml

    device = _device()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model  # the tests' 2-layer BERT (d=32) from a config + WordPiece vocab

    cpu = device.type != "cuda"
    model_dir = build_tiny_model(work / "tiny_bert", "bert")
    run_root = work / "runs"
    stage_common = {"epochs": 1, "lr": 1.0e-3, "batch_size": 32, "mixed_precision": "bf16"}
    recipe = {
        "name": "gpu_check_tiny",
        "model": str(model_dir),
        "task": "sst2",
        "data": {"source": "glue_dir", "path": str(REPO / "data" / "sst2_demo"), "max_seq_length": 64,
                 "max_train_examples": 256 if cpu else 1024, "max_dev_examples": 128 if cpu else 872},
        "seed": 0,
        "output_dir": str(run_root),
        "stages": [
            {"id": "teacher", "stage": "finetune", **stage_common},
            {"id": "soft", "stage": "ltp_soft", **stage_common, "temperature": 0.1, "lambda": 0.1, "final_threshold": 0.5,
             "threshold_lr": 0.002},
            {"id": "hard", "stage": "ltp_hard", **stage_common},
            {"id": "int8", "stage": "quantize", "calibration_batches": 4, "backend": "cuda" if not cpu else "auto"},
        ],
    }
    rpath = work / "gpu_check_tiny.yaml"
    rpath.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ)
    if cpu:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    # validate first: a schema problem is reported as such, not as a launch failure
    val = subprocess.run([sys.executable, "-m", "ltp_compress.pipeline.cli", "validate", str(rpath)],
                         capture_output=True, text=True, env=env, cwd=work, timeout=120)
    if val.returncode != 0:
        print(val.stdout + val.stderr)
        return {"ok": False, "phase": "validate", "output": _tail(val.stdout + val.stderr, 2000), "recipe": recipe}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no"] + (["--cpu"] if cpu else []) + \
          ["-m", "ltp_compress.pipeline.cli", "run", str(rpath)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    secs = time.perf_counter() - t0
    print(_tail(p.stdout + p.stderr, 6000))
    run_dir = run_root / recipe["name"]
    out = {"ok": p.returncode == 0, "phase": "run", "returncode": p.returncode, "seconds": round(secs, 1),
           "command": " ".join(cmd), "recipe": recipe, "run_dir": str(run_dir)}
    rep = run_dir / "report.json"
    if rep.is_file():
        report = json.loads(rep.read_text())
        out["stages"] = [{k: s.get(k) for k in ("id", "stage", "metrics", "timings", "cost") if k in s}
                         for s in report.get("stages", [])]
        out["ok"] = out["ok"] and [s["id"] for s in out["stages"]] == ["teacher", "soft", "hard", "int8"]
    else:
        out["ok"] = False
        out["problem"] = f"{rep} not written"
    from ltp_compress.kernels import KERNEL_COUNTER
    from ltp_compress.pipeline.run_dir import read_stage_meta

    for meta in sorted(run_dir.glob("stages/*-int8/meta.json")):
        kernel = read_stage_meta(meta).extra.get("kernel")  # quantize: {"backend": resolved, "counters": {...}}
        out["int8_kernel"] = kernel
        if not cpu and not (isinstance(kernel, dict) and kernel.get("backend") == "cuda"
                            and (kernel.get("counters") or {}).get(KERNEL_COUNTER["cuda"], 0) > 0):
            out["ok"] = False
            out["problem"] = f"quantize stage did not evaluate on the cuda INT8 kernel: {kernel!r}"
    if "int8_kernel" not in out:
        out["ok"] = False
        out["problem"] = f"no {run_dir}/stages/*-int8/meta.json"
    envf = run_dir / "environment.json"
    if envf.is_file():
        out["environment"] = json.loads(envf.read_text())
    return out


def step_int8_correct(work: Path) -> dict:
    import torch

    from ltp_compress import kernels as K

    device = _device()
    backend = _int8_backend(device)
    shapes = [(1, 32, 32), (3, 30, 33), (17, 384, 1536), (128, 768, 768), (333, 768, 3072), (1000, 3072, 768)]
    if device.type == "cuda":
        shapes += [(4096, 768, 3072), (16, 768, 768), (8, 3072, 768)]
    rtol, atol = 1e-5, 1e-6  # tests/test_kernels.py
    rows, ok = [], True
    for m, k, n in shapes:
        g = torch.Generator().manual_seed(m * 7 + k * 3 + n)
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) * 0.05
        b = torch.randn(n, generator=g)
        w_q, w_scale = K.quantize_per_channel_symmetric(w, qmax=K.weight_qmax(backend))
        x_scale = float(x.abs().max()) / 127
        x_q = K.quantize_per_tensor_symmetric(x, x_scale)
        exact = x_q.long() @ w_q.long().T  # CPU int64: exact
        acc = K.int8_matmul_int32(x_q.to(device), w_q.to(device), backend).cpu()
        packed = K.pack_weight(w_q.to(device), w_scale.to(device), b.to(device), backend)
        for gelu in (False, True):
            K.reset_kernel_counters()
            y = K.int8_linear(x.to(device), x_scale, packed, fuse_gelu=gelu)
            if device.type == "cuda":
                torch.cuda.synchronize()
            counters = K.kernel_counters()
            ref = K.int8_linear_reference(x_q, x_scale, w_q, w_scale, b, fuse_gelu=gelu)  # CPU reference
            err = float((y.cpu().double() - ref.double()).abs().max())
            bound = rtol * float(ref.abs().max()) + atol
            row = {"m": m, "k": k, "n": n, "gelu": gelu, "int32_exact": bool(torch.equal(acc.long(), exact)),
                   "max_abs_err": err, "bound": bound, "kernels": counters,
                   "ok": bool(torch.equal(acc.long(), exact)) and err <= bound and y.dtype == torch.float32}
            ok &= row["ok"]
            rows.append(row)
            print(row)
    return {"ok": ok, "backend": backend, "device": str(device), "rows": rows}


def _time_fn(fn, device, min_total_s: float = 0.05, reps_cap: int = 200, warmup: int = 3, rounds: int = 5) -> float:
    """Median seconds per call of fn(): warm up, then `rounds` rounds of n calls (n sized so a round
    takes ~min_total_s, at most reps_cap) timed with CUDA events (perf_counter on CPU)."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(reps_cap, max(1, min_total_s / one)))
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(n):
                fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3 / n)
        else:
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def step_gemm_bench(work: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from ltp_compress import kernels as K

    device = _device()
    backend = _int8_backend(device)
    cuda = device.type == "cuda"
    ms = (128, 1024, 4096) if cuda else (32, 64)
    kns = ((768, 768), (768, 3072), (3072, 768)) if cuda else ((64, 64), (64, 256), (256, 64))
    torch.manual_seed(0)
    rows = []
    for m in ms:
        for k, n in kns:
            x = torch.randn(m, k, device=device)
            w = torch.randn(n, k, device=device) * 0.05
            b = torch.randn(n, device=device)
            w_q, w_scale = K.quantize_per_channel_symmetric(w, qmax=K.weight_qmax(backend))
            x_scale = float(x.abs().max()) / 127
            x_q = K.quantize_per_tensor_symmetric(x, x_scale)
            packed = K.pack_weight(w_q, w_scale, b, backend)
            xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
            t_bf16 = _time_fn(lambda: F.linear(xb, wb, bb), device)
            t_int8_gemm = _time_fn(lambda: K.int8_matmul_int32(x_q, w_q, backend), device)
            t_int8_full = _time_fn(lambda: K.int8_linear(x, x_scale, packed), device)
            t_fp32 = _time_fn(lambda: F.linear(x, w, b), device)
            ops = 2.0 * m * k * n
            row = {"m": m, "k": k, "n": n, "bf16_tflops": ops / t_bf16 / 1e12, "int8_gemm_tops": ops / t_int8_gemm / 1e12,
                   "int8_linear_tops": ops / t_int8_full / 1e12, "fp32_tflops": ops / t_fp32 / 1e12,
                   "int8_gemm_speedup_vs_bf16": t_bf16 / t_int8_gemm, "int8_linear_speedup_vs_bf16": t_bf16 / t_int8_full,
                   "us": {"bf16": t_bf16 * 1e6, "int8_gemm": t_int8_gemm * 1e6, "int8_linear": t_int8_full * 1e6, "fp32": t_fp32 * 1e6}}
            rows.append(row)
            print({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items() if k2 != "us"})
    return {"ok": True, "backend": backend, "device": str(device), "timing": "CUDA events, median of 5 rounds" if cuda else "perf_counter",
            "int8_linear": "quantise fp32 input + int8 GEMM + dequant/bias epilogue (fp32 out)", "rows": rows}


def _random_batches(n: int, bs: int, vocab: int, lo: int, hi: int, seed: int, device):
    """Seeded random inputs ([CLS] ... [SEP], lengths uniform in [lo, hi]), padded per batch."""
    import torch

    from ltp_compress.tasks.data import Batch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    batches = []
    for s in range(0, n, bs):
        ls = lengths[s:s + bs]
        width = int(ls.max())
        ids = torch.zeros(len(ls), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, L in enumerate(ls.tolist()):
            ids[j, :L] = torch.randint(1000, vocab, (L,), generator=g)
            ids[j, 0], ids[j, L - 1] = 101, 102
            mask[j, :L] = 1
        tt = torch.zeros_like(ids)
        batches.append(Batch(ids, mask, tt, torch.zeros(len(ls), dtype=torch.long), torch.arange(s, s + len(ls))).to(device))
    return batches, float(lengths.float().mean())


def step_model_bench(work: Path) -> dict:
    import copy

    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from ltp_compress.modeling.accounting import EncoderShape, relative_flops
    from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_packed, linear_threshold_init
    from ltp_compress.modeling.quantized import calibrate, convert_to_int8

    device = _device()
    cuda = device.type == "cuda"
    backend = _int8_backend(device)
    torch.manual_seed(0)
    if cuda:
        cfg = BertConfig(num_labels=2)  # BERT-base: 12 layers, d=768, 12 heads, FFN 3072
        n_cal, n32, n1, lo, hi = 256, 256, 48, 32, 128
    else:
        cfg = BertConfig(num_labels=2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        n_cal, n32, n1, lo, hi = 32, 64, 4, 8, 32
    model = BertForSequenceClassification(cfg).eval().to(device)
    shape = EncoderShape.from_config(cfg)
    L = cfg.num_hidden_layers
    cal, _ = _random_batches(n_cal, 32, cfg.vocab_size, lo, hi, 1, device)

    @torch.no_grad()
    def rel_flops(m, pruning, batches):
        kept, lens = [], []
        for b in batches:
            out = forward_packed(m, b.input_ids, b.attention_mask, b.token_type_ids, pruning, return_kept=True)
            kept.append(out.kept_tokens.cpu().numpy())
            lens.append(b.attention_mask.sum(1).cpu().numpy())
        return relative_flops(np.concatenate(kept), np.concatenate(lens), shape)

    # thresholds: the paper's linear ramp, shifted by one offset (bisection) to ~40 % relative FLOPs
    base = np.asarray(linear_threshold_init(L, 0.5), dtype=np.float64)
    ramp = np.arange(1, L + 1) / L
    target = 0.40

    def at(c):
        return PruningConfig(mode="threshold", thresholds=(base + c * ramp).tolist())

    lo_c, hi_c = -8.0, 8.0
    for _ in range(18):
        mid = (lo_c + hi_c) / 2
        if rel_flops(model, at(mid), cal) > target:
            lo_c = mid
        else:
            hi_c = mid
    pruning = at(hi_c)
    fitted = rel_flops(model, pruning, cal)
    scales = calibrate(model, cal[:4], pruning)
    qmodel, qinfo = convert_to_int8(model, scales, backend=backend)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    none = PruningConfig()

    variants = {
        "hf_bf16_dense": lambda b: bf16(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.token_type_ids).logits,
        "hf_fp32_dense": lambda b: model(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.token_type_ids).logits,
        "ltp_fp32_pruned": lambda b: forward_packed(model, b.input_ids, b.attention_mask, b.token_type_ids, pruning).logits,
        "ltp_int8_dense": lambda b: forward_packed(qmodel, b.input_ids, b.attention_mask, b.token_type_ids, none).logits,
        "ltp_int8_pruned": lambda b: forward_packed(qmodel, b.input_ids, b.attention_mask, b.token_type_ids, pruning).logits,
    }
    results = {}
    for bs, n in ((1, n1), (32, n32)):
        batches, mean_len = _random_batches(n, bs, cfg.vocab_size, lo, hi, 2 + bs, device)
        row = {"examples": n, "mean_tokens": mean_len, "relative_flops_pruned": rel_flops(model, pruning, batches),
               "relative_flops_int8_pruned": rel_flops(qmodel, pruning, batches)}
        for name, fn in variants.items():
            with torch.inference_mode():
                def run_all():
                    for b in batches:
                        fn(b)
                try:
                    secs = _time_fn(run_all, device, min_total_s=0.2, reps_cap=5, warmup=1, rounds=3)
                    row[name] = {"examples_per_s": n / secs, "ms_per_batch": secs / len(batches) * 1e3}
                except Exception as e:  # noqa: BLE001 - one variant failing is recorded, the rest still run
                    row[name] = {"error": f"{type(e).__name__}: {e}"}
        with torch.inference_mode():  # agreement of the INT8 pruned runtime with the fp32 pruned one
            b = batches[0]
            y32 = variants["ltp_fp32_pruned"](b).float()
            y8 = variants["ltp_int8_pruned"](b).float()
            row["int8_vs_fp32_pruned_max_abs_logit_diff"] = float((y32 - y8).abs().max())
        base_eps = row["hf_bf16_dense"].get("examples_per_s")
        for name in variants:
            if base_eps and "examples_per_s" in row[name]:
                row[name]["speedup_vs_hf_bf16_dense"] = row[name]["examples_per_s"] / base_eps
        results[f"bs{bs}"] = row
        print(f"bs {bs}: " + json.dumps({k: v for k, v in row.items()}, default=str))
    ok = all("error" not in v for r in results.values() for v in r.values() if isinstance(v, dict))
    return {"ok": ok, "device": str(device), "int8_backend": qinfo.backend, "config": {"layers": L, "hidden": cfg.hidden_size,
            "ffn": cfg.intermediate_size, "heads": cfg.num_attention_heads},
            "thresholds": pruning.thresholds, "target_relative_flops": target, "fitted_relative_flops": fitted,
            "lengths": [lo, hi], "weights": "random (config-built), so accuracy is meaningless; speed only", "results": results}


STEP_FUNCS = {"env": step_env, "bf16_run": step_bf16_run, "int8_correct": step_int8_correct,
              "gemm_bench": step_gemm_bench, "model_bench": step_model_bench}


def main_step(args) -> int:
    work = Path(args.work)
    t0 = time.perf_counter()
    try:
        res = STEP_FUNCS[args.step](work)
    except SystemExit as e:
        res = {"ok": False, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded in the summary with the traceback
        import traceback

        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    _atomic_json(Path(args.result), res)
    return 0 if res.get("ok") else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work")
    ap.add_argument("--setup-log")
    ap.add_argument("--step", choices=sorted(STEP_FUNCS))
    ap.add_argument("--result")
    args = ap.parse_args(argv)
    if args.step:
        if not args.work or not args.result:
            ap.error("--step needs --work and --result")
        return main_step(args)
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
