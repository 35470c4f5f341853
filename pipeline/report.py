"""Run reports: report.json collects every finished stage's meta; report.md renders from it."""

from __future__ import annotations

from pathlib import Path

from ltp_compress.fileio import atomic_write_json, atomic_write_text
from ltp_compress.pipeline.run_dir import RunDir


def collect_report(run_dir: Path) -> dict:
    run = RunDir(Path(run_dir))
    recipe = run.recipe()
    stages = []
    for rec in run.finished():
        meta = rec.meta
        row = {
            "id": rec.id, "stage": rec.stage, "dir": str(rec.dir.relative_to(run.path)),
            "metrics": meta.get("metrics"), "cost": meta.get("cost"),
            "model_size_bytes": meta.get("model_size_bytes"), "parameter_count": meta.get("parameter_count"),
            "wall_time_s": meta.get("wall_time_s"),
        }
        for key in ("pruning", "kernel", "final_lambda", "calibration", "deploy_dir"):
            if key in meta.get("extra", {}):
                row[key] = meta["extra"][key]
        stages.append(row)
    plots = sorted(str(p.relative_to(run.path)) for p in run.plots_dir.glob("*.png"))
    return {"name": recipe["name"], "task": recipe["task"], "model": recipe["model"], "seed": recipe["seed"],
            "environment": run.environment(), "stages": stages, "plots": plots}


def render_markdown(report: dict) -> str:
    lines = [f"# Run `{report['name']}`", "",
             f"task **{report['task']}**, model `{report['model']}`, seed {report['seed']}", ""]
    header = "| stage | type | dev metrics | ex/s | mean tokens | rel. FLOPs | GFLOPs/ex | rel. BOPs vs FP16 dense | rel. BOPs vs FP32 dense | params | size on disk | wall s |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for s in report["stages"]:
        metrics = s.get("metrics") or {}
        mtxt = "; ".join(
            f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in ("examples_per_s", "mean_tokens", "num_examples"))
            for split, m in metrics.items()
        )
        first = next(iter(metrics.values()), {})
        cost = s.get("cost") or {}
        lines.append("| " + " | ".join([
            s["id"], s["stage"], mtxt or "-",
            _f(first.get("examples_per_s"), "{:.1f}"), _f(first.get("mean_tokens"), "{:.1f}"),
            _f(cost.get("relative_flops"), "{:.3f}"), _f(cost.get("gflops_per_example"), "{:.3f}"),
            _f(cost.get("relative_bops_vs_fp16_dense"), "{:.4f}"), _f(cost.get("relative_bops_vs_fp32_dense"), "{:.4f}"),
            _f(s.get("parameter_count"), "{:,}"), _f((s.get("model_size_bytes") or 0) / 2**20 if s.get("model_size_bytes") else None, "{:.1f} MiB"),
            _f(s.get("wall_time_s"), "{:.0f}"),
        ]) + " |")
    lines.append("")
    pruned = [s for s in report["stages"] if (s.get("cost") or {}).get("mean_tokens_per_layer")]
    if pruned:
        lines += ["## Tokens entering each layer (dev mean)", ""]
        L = len(pruned[0]["cost"]["mean_tokens_per_layer"])
        lines.append("| stage | " + " | ".join(f"L{l}" for l in range(L)) + " |")
        lines.append("|---|" + "---|" * L)
        for s in pruned:
            lines.append(f"| {s['id']} | " + " | ".join(f"{v:.1f}" for v in s["cost"]["mean_tokens_per_layer"]) + " |")
        lines.append("")
    th = [s for s in report["stages"] if (s.get("pruning") or {}).get("mode") not in (None, "none")]
    if th:
        lines += ["## Pruning rules", ""]
        for s in th:
            p = s["pruning"]
            vals = p.get("thresholds") if p["mode"] == "threshold" else p.get("keep_ratios")
            lines.append(f"- `{s['id']}`: {p['mode']} " + ", ".join(f"{v:.3f}" for v in vals))
        lines.append("")
    for plot in report.get("plots", []):
        lines += [f"![{plot}]({plot})", ""]
    env = report.get("environment", {})
    if env:
        pk = env.get("packages", {})
        lines += ["## Environment", "", f"python {env.get('python')}, torch {pk.get('torch')}, transformers {pk.get('transformers')}, "
                  f"threads {env.get('torch_threads')}, cuda {env.get('cuda')}", ""]
    return "\n".join(lines)


def _f(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def write_report(run_dir: Path) -> tuple[Path, Path]:
    from ltp_compress.pipeline.plots import plot_run

    run = RunDir(Path(run_dir))
    plot_run(run.path)
    report = collect_report(run.path)
    atomic_write_json(run.report_json, report)
    atomic_write_text(run.report_md, render_markdown(report))
    return run.report_json, run.report_md
