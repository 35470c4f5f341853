"""The end-to-end benchmark's Markdown report and its output files (<name>.json + <name>.md)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from ltp_compress.fileio import atomic_write_text
from ltp_compress.pipeline.bench_analysis import ACCURACY_GAP_POINTS
from ltp_compress.pipeline.environment import environment_summary
from ltp_compress.pipeline.peers import REGISTRY

DESCRIPTIONS = {name: peer.description for name, peer in REGISTRY.items()}


def _fmt(v, nd=1, suffix=""):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}{suffix}"


def _first(v):
    return v[0] if isinstance(v, list) else v


def render_pruning_speedup(res: dict) -> list[str]:
    """The realised speedup of token pruning alone per runtime (issue goal: >= 0.9 of the FLOPs reduction)."""
    ps = res.get("pruning_speedup") or {}
    if not ps:
        return []
    bss = res["batch_sizes"]
    L = ["## Token pruning alone: realised speedup vs FLOPs reduction", "",
         "pruned INT8 vs dense INT8 on the same runtime; FLOPs reduction = dense / pruned relative FLOPs (executed convention), "
         "counted from the tokens each system's own runtime reports entering each layer on the main-batch-size pass; "
         "realised fraction = speedup / FLOPs reduction", "",
         "| runtime | pruned / dense | FLOPs reduction | " + " | ".join(f"bs{b} speedup | bs{b} realised" for b in bss) + " |",
         "|" + "---|" * (3 + 2 * len(bss))]
    for runtime, row in ps.items():
        if "by_batch_size" not in row:
            L.append(f"| {runtime} | {row['pruned']} / {row['dense']} | {row.get('status')} |" + " |" * (2 * len(bss)))
            continue
        cells = []
        for b in bss:
            x = row["by_batch_size"].get(str(b))
            cells += [_fmt(x["speedup"], 2, "x"), _fmt(x["realised_fraction"], 2)] if x else ["-", "-"]
        L.append(f"| {runtime} | {row['pruned']} / {row['dense']} | {_fmt(row['flops_reduction'], 2, 'x')} | " + " | ".join(cells) + " |")
    for runtime, row in ps.items():
        if "relative_flops_run" not in row:
            continue
        fr = [_fmt(row["by_batch_size"].get(str(b), {}).get("realised_fraction_of_run_flops"), 2) for b in bss]
        L += ["", f"{runtime} runs the last layer on [CLS] only (`last_layer_rows` {row['last_layer_rows']!r}: its attention "
              "for the [CLS] query, its output projection and FFN on the [CLS] row), the dense model too, so the FLOPs it "
              f"runs fall {_fmt(row['run_flops_reduction'], 2, 'x')}, not {_fmt(row['flops_reduction'], 2, 'x')} "
              "(the executed convention charges the dense model's last layer on every token): realised fraction of the "
              f"run FLOPs' reduction at bs {' / '.join(str(b) for b in bss)}: {' / '.join(fr)}"]
    return L + [""]


def render_profile(system: str, prof: dict | None) -> list[str]:
    """The op-class profile section of `system` (bench_profile.profile_int8's result; none: no section)."""
    if not prof:
        return []
    L = [f"## Profile: {system} at bs {prof.get('batch_size')}", ""]
    if prof.get("status") != "ok":
        L.append(f"failed: {prof.get('error')}")
    else:
        L += ["| op class | self CPU s | fraction |", "|---|---|---|"]
        for k, v in prof["time_by_summary_class_s"].items():
            L.append(f"| **{k}** | {v:.4f} | {prof['fraction_by_summary_class'].get(k, 0):.1%} |")
        for k, v in prof["time_by_class_s"].items():
            L.append(f"| {k} | {v:.4f} | {prof['fraction_by_class'].get(k, 0):.1%} |")
        ref = prof.get("standalone_reference") or {}
        L += ["", f"INT8 GEMMs inside the model: {prof['int8_linear_calls']} calls, {prof['int8_gemm_macs'] / 1e9:.3f} GMAC, "
              f"kernel time {prof['int8_gemm_kernel_s']:.4f} s -> effective {_fmt(prof['effective_gemm_gops'], 1)} GOP/s "
              f"(incl. activation quantisation: {_fmt(prof['effective_int8_linear_gops_incl_quantize'], 1)} GOP/s); "
              f"best standalone at the model's shapes {_fmt(ref.get('gops'), 1)} GOP/s "
              f"(measured now: {ref.get('measured')}; gemm_bench.json at model shapes: {ref.get('gemm_bench_best_model_shapes')}, "
              f"any shape: {ref.get('gemm_bench_best_any_shape')}); "
              f"efficiency {_fmt(prof.get('gemm_efficiency_vs_best_standalone'), 2)}", ""]
    return L


def render_markdown(res: dict) -> str:
    bss = res["batch_sizes"]
    L = ["# End-to-end inference benchmark", "",
         f"task `{res['task']}`, {res['data']['examples']} dev examples (mean {res['data']['mean_tokens']:.1f} tokens, "
         f"max {res['data']['max_tokens']}), {res['threads']} threads, batch sizes {bss}, {res['repeats']} timed repeats, "
         f"{res.get('rounds', 1)} interleaved round(s), isolation: {res['isolation']}; tokenisation {res.get('tokenization', '')}", "",
         f"models: teacher `{res['models']['teacher']}`, hard `{res['models']['hard']}`, int8 `{res['models']['int8']}`", ""]
    for role, ident in (res.get("checkpoints") or {}).items():
        if ident:
            L.append(f"- {role}: recipe `{ident.get('recipe')}`, stage `{ident.get('stage')}`, "
                     + ", ".join(f"{k} sha256 `{v[:16]}…`" for k, v in ident.get("files", {}).items()))
    L += ["",
         f"load average before / after: {res['loadavg_before']} / {res['loadavg_after']} "
         "(other processes on the machine distort timings)", "", environment_summary(res.get("environment")), ""]
    overlapped = [s for s in res["systems"] if any("pass" in x for x in (res["results"][s].get("runs") or []))]
    if overlapped:
        L += ["batch sizes > 1 run as several requests at once (the runtime's throughput setting: OpenVINO's THROUGHPUT hint "
              "with an AsyncInferQueue; ONNX Runtime's thread-safe Run from `threads` threads on a one-thread session; "
              "the fused runtime's `threads` concurrent calls of one thread each; "
              "each system's info.settings in the JSON): " + ", ".join(overlapped) + "; every other system one batch at a time", ""]
    head = ["system", "main metric", "accuracy"] + [f"bs{b} ex/s" for b in bss] + ["bs1 p50 ms", "bs1 p95 ms", "peak RSS MB"]
    head += ["INT8 vs FP32 (points)", "fast ops"]
    head += [f"bs{b} vs {res.get('baseline', 'baseline')}" for b in bss] + [f"bs{b} vs best INT8 peer" for b in bss]
    head += [f"bs{b} vs best dense peer" for b in bss] + ["setup s", "warmup s"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in res["systems"]:
        r = res["results"][s]
        if r.get("status") != "ok":
            reason = str(r.get("error", "unknown")).replace("|", "/").replace("\n", " ")[:160]
            L.append(f"| {s} | failed: {reason} |" + " |" * (len(head) - 2))
            continue
        thr = {x["batch_size"]: x for x in r["runs"]}
        rss = r.get("peak_rss_mb")
        rss_s = _fmt(rss, 0) if rss is not None else (f"+{_fmt(r.get('rss_growth_mb'), 0)} (growth)")
        row = [s, _fmt(r["metrics"].get("main"), 4), _fmt(r.get("accuracy"), 4)]
        row += [_fmt(thr[b]["examples_per_s"]) if b in thr else "-" for b in bss]
        row += [_fmt(r.get("latency_ms_p50"), 2), _fmt(r.get("latency_ms_p95"), 2), rss_s]
        gap = r.get("accuracy_vs_fp32") or {}
        gap_s = "-" if "gap_points" not in gap else (f"{gap['gap_points']:+.1f} vs {gap['reference']}" + (" **FLAG**" if gap["flag"] else ""))
        fo = r.get("fast_ops")
        row += [gap_s, "-" if not fo else ("confirmed" if fo["confirmed"] else "**NOT confirmed**")]
        row += [_fmt(r["ratios"][str(b)]["vs_baseline"], 2, "x") for b in bss]
        row += [_fmt(r["ratios"][str(b)]["vs_best_int8_peer"], 2, "x") for b in bss]
        row += [_fmt(r["ratios"][str(b)].get("vs_best_dense_peer"), 2, "x") for b in bss]
        setup = r.get("setup_s")
        row += [_fmt(setup if not isinstance(setup, list) else statistics.median(setup), 1),
                " / ".join(_fmt(_first(thr[b]["warmup_s"]), 1) for b in bss if b in thr)]
        L.append("| " + " | ".join(row) + " |")
    L += ["", "best dense INT8 peer per batch size: "
          + ", ".join(f"bs{b}: {(v or {}).get('system', 'none')}" for b, v in res["best_int8_peer"].items()), "",
          f"best dense peer of any precision within {ACCURACY_GAP_POINTS:g} point(s) of its FP32 reference, per batch size: "
          + ", ".join(f"bs{b}: {v['system']} ({v['main_points']:.2f})" if v else f"bs{b}: none"
                      for b, v in (res.get("best_dense_peer") or {}).items()), ""]
    L += render_pruning_speedup(res)
    L += ["## Systems", ""]
    for s in res["systems"]:
        r = res["results"][s]
        info = r.get("info", {})
        line = f"- `{s}`: {DESCRIPTIONS.get(s, '')}"
        if info.get("api"):
            line += f"; API: `{info['api']}`"
        if r.get("status") != "ok":
            line += f"; **failed**: {r.get('error')}"
        else:
            if info.get("settings"):
                line += f"; settings: `{json.dumps(info['settings'], default=str)}`"
            docs = info.get("docs")
            if docs:
                line += "; docs: " + ", ".join(docs if isinstance(docs, list) else [docs])
            rp = r.get("runtime_profile")
            if rp:
                counts = rp.get("op_counts_per_run") or rp.get("runtime_layers") or rp.get("error")
                line += f"; runtime profile ({rp.get('tool', 'failed')}): {counts}"
            if r.get("fast_ops"):
                line += f"; fast ops: {r['fast_ops']['found']}"
            ops = r.get("int8_ops_observed")
            if ops is not None:
                line += f"; int8 ops seen by the profiler: {ops if ops else 'none'}"
            if r.get("kernel_counters") is not None:
                line += f"; kernel counters: {r['kernel_counters']}"
            for n in info.get("notes") or []:
                line += f"; note: {n}"
            if info.get("shapes"):
                line += f"; shapes: {info['shapes']}"
        L.append(line)
    L += ["", f"calibration for every statically quantised system: {res['data']['calibration']}", ""]
    for system in (s for s in res["systems"] if s in REGISTRY and REGISTRY[s].op_class_profile):
        L += render_profile(system, (res["results"].get(system) or {}).get("profile"))
    L += ["", res["method"], "", f"command: `{res['command']}`", ""]
    return "\n".join(L)


def write_outputs(res: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, mp = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(jp, json.dumps(res, indent=2, default=str))
    atomic_write_text(mp, render_markdown(res))
    return jp, mp
