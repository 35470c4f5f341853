"""Run reports: report.json collects every finished stage's meta and the data summary;
report.md renders from it. Validation (what every choice was made on) and dev (the test set,
evaluated only) are shown side by side; FLOPs and BOPs in both conventions ("executed": what runs;
"paper": the official LTP code's count, comparable with the paper)."""

from __future__ import annotations

from pathlib import Path

from ltp_compress.fileio import atomic_write_json, atomic_write_text
from ltp_compress.pipeline.environment import environment_summary
from ltp_compress.pipeline.run_dir import RunDir

_EXTRA_KEYS = ("pruning", "kernel", "final_lambda", "calibration", "deploy_dir", "flops_target", "learned_something", "refit")
_NOT_METRICS = ("examples_per_s", "mean_tokens", "num_examples", "by_length")


def collect_report(run_dir: Path) -> dict:
    run = RunDir(Path(run_dir))
    recipe = run.recipe()
    stages = []
    for rec in run.finished():
        meta = rec.meta
        extra = meta.extra
        row = {
            "id": rec.id, "stage": rec.stage, "dir": str(rec.dir.relative_to(run.path)),
            "metrics": meta.metrics, "cost": meta.cost, "validation_cost": extra.get("validation_cost"),
            "model_size_bytes": meta.model_size_bytes, "parameter_count": meta.parameter_count,
            "wall_time_s": meta.wall_time_s,
        }
        row.update({k: extra[k] for k in _EXTRA_KEYS if extra.get(k) is not None})
        stages.append(row)
    plots = sorted(str(p.relative_to(run.path)) for p in run.plots_dir.glob("*.png"))
    return {"name": recipe["name"], "task": recipe["task"], "model": recipe["model"], "seed": recipe["seed"],
            "data": run.data_summary(), "environment": run.environment(), "stages": stages, "plots": plots}


def _conv(cost: dict | None, convention: str, key: str):
    return ((cost or {}).get("by_convention") or {}).get(convention, {}).get(key)


def render_markdown(report: dict) -> str:
    lines = [f"# Run `{report['name']}`", "",
             f"task **{report['task']}**, model `{report['model']}`, seed {report['seed']}", "",
             "Every choice (best checkpoint, the FLOPs controller, FLOPs calibration, INT8 fallback) was made on the **validation** "
             "split carved from train; **dev** is the test set, evaluated only.", ""]
    data = report.get("data") or {}
    if data.get("splits"):
        carve = data.get("validation_carving", {})
        lines += ["## Data", "", "| split | examples | mean tokens | truncated | trivial baseline (main) |", "|---|---|---|---|---|"]
        for name, s in data["splits"].items():
            tb = s.get("trivial_baseline")
            lines.append(f"| {name} | {s['examples']} | {s['mean_tokens']:.1f} | {s['truncated']} (at {data.get('max_seq_length')}) | "
                         + (f"{100 * tb['main']:.2f} ({tb['predictor']})" if tb else "-") + " |")
        if carve:
            lines += ["", f"validation: {carve.get('method')}; {carve.get('dropped_from_train_as_overlapping')} overlapping training rows "
                      f"dropped; seed {carve.get('seed')}"]
        lf = data.get("train_length_filter")
        if lf:
            lines += ["", f"train: only examples shorter than {lf['threshold_tokens']:g} tokens, the {lf['quantile']:g} quantile of the "
                      f"validation token counts (`{lf['key']}`): {lf['train_examples_after']} of {lf['train_examples_before']} kept "
                      f"(mean tokens {lf['mean_tokens_before']:.1f} -> {lf['mean_tokens_after']:.1f}); validation and dev not filtered"]
        lines.append("")
    flagged = [s for s in report["stages"] if s.get("learned_something") and not s["learned_something"]["ok"]]
    for s in flagged:
        ls = s["learned_something"]
        lines += [f"> **WARNING** `{s['id']}`: validation main {100 * ls['validation_main']:.2f} is only "
                  f"{ls['margin_points']:+.2f} points above the trivial baseline ({100 * ls['trivial_validation_main']:.2f}; "
                  f"{ls['required_margin_points']:.0f} required): this model learned (almost) nothing, and pruning it proves nothing.", ""]
    header = ("| stage | type | validation main | dev main | dev metrics | rel. FLOPs executed | rel. FLOPs paper | "
              "rel. BOPs vs FP16 dense (executed / paper) | GFLOPs/ex | dev ex/s | params | size on disk | wall s |")
    lines += ["## Stages (FLOPs/BOPs on dev)", "", header, "|" + "---|" * (header.count("|") - 1)]
    splits = data.get("splits") or {}
    if "validation" in splits:  # the trivial predictor beside every model's metric
        trivial_dev = next((v["trivial_baseline"] for k, v in splits.items() if k not in ("train", "validation")), None)
        lines.append(f"| trivial baseline | {splits['validation']['trivial_baseline']['predictor']} | "
                     f"{splits['validation']['trivial_baseline']['main']:.4f} | "
                     + (f"{trivial_dev['main']:.4f}" if trivial_dev else "-") + " |" + " - |" * (header.count("|") - 5))
    for s in report["stages"]:
        metrics = s.get("metrics") or {}
        val = metrics.get("validation", {})
        dev_splits = {k: v for k, v in metrics.items() if k != "validation"}
        first_dev = next(iter(dev_splits.values()), {})
        mtxt = "; ".join(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k not in _NOT_METRICS)
                         for split, m in dev_splits.items())
        cost = s.get("cost")
        lines.append("| " + " | ".join([
            s["id"], s["stage"], _f(val.get("main"), "{:.4f}"), _f(first_dev.get("main"), "{:.4f}"), mtxt or "-",
            _f(_conv(cost, "executed", "relative_flops"), "{:.3f}"), _f(_conv(cost, "paper", "relative_flops"), "{:.3f}"),
            _f(_conv(cost, "executed", "relative_bops_vs_fp16_dense"), "{:.4f}") + " / " + _f(_conv(cost, "paper", "relative_bops_vs_fp16_dense"), "{:.4f}"),
            _f((cost or {}).get("gflops_per_example"), "{:.3f}"), _f(first_dev.get("examples_per_s"), "{:.1f}"),
            _f(s.get("parameter_count"), "{:,}"), _f((s.get("model_size_bytes") or 0) / 2**20 if s.get("model_size_bytes") else None, "{:.1f} MiB"),
            _f(s.get("wall_time_s"), "{:.0f}"),
        ]) + " |")
    lines.append("")
    targets = [s for s in report["stages"] if s.get("flops_target")]
    if targets:
        lines += _section("FLOPs targets", ["stage", "target", "convention", "fitted on", "validation", "dev",
                                            "within tolerance (validation / dev)"], [
            [s["id"], f"{t['target_flops']:.3f} ± {100 * t['tolerance']:.0f}%", t["convention"], t["calibration_inputs"],
             f"{t['validation_relative_flops']:.3f}", f"{t['dev_relative_flops']:.3f}",
             f"{t['validation_within_tolerance']} / {t['dev_within_tolerance']}"]
            for s in targets for t in [s["flops_target"]]])
    corrections = [s for s in report["stages"] if (s.get("calibration") or {}).get("correction_cost_points") is not None]
    if corrections:
        lines += _section("End-of-stage FLOPs corrections", ["stage", "controller", "FLOPs before (validation)", "reached target before",
                                                             "offset", "validation main before -> after", "cost (points)"], [
            [s["id"], c["controller"], f"{c['before']['validation_relative_flops']:.3f}", str(c["reached_target_before_correction"]),
             f"{c['offset']:+.4f}", f"{c['before']['validation_main']:.4f} -> {c['validation_main_after']:.4f}",
             f"{c['correction_cost_points']:.2f}"]
            for s in corrections for c in [s["calibration"]]])
        warnings = [f"- **WARNING** `{s['id']}`: {w}" for s in corrections for w in s["calibration"]["warnings"]]
        lines += warnings + ([""] if warnings else [])
    lines += _by_length_section(report["stages"])
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
        if env.get("cpu_model") is not None or env.get("isa_flags"):  # runs before the environment block have neither
            lines += [environment_summary(env), ""]
    return "\n".join(lines)


#: the length slices of an evaluated split (stages/length_slices.py SLICES), shortest first
_SLICES = ("short", "q2_q3", "long")


def _by_length_section(stages: list[dict]) -> list[str]:
    """The first dev set's results by input length (its own token-length quartiles): per stage and
    slice the main metric and the relative FLOPs (paper convention); none when no stage has them."""
    rows, head = [], None
    for s in stages:
        dev = next((m for k, m in (s.get("metrics") or {}).items() if k != "validation"), None)
        bl = (dev or {}).get("by_length")
        if not bl:
            continue
        head = head or bl
        cells = [s["id"]]
        for name in _SLICES:
            sl = bl["slices"][name]
            cells += [_f((sl.get("metrics") or {}).get("main"), "{:.4f}"), _f(sl["relative_flops"]["paper"], "{:.3f}")]
        rows.append(cells)
    if head is None:
        return []
    b, sl = head["boundaries"], head["slices"]
    note = (f"short: n ≤ Q2 = {b['q2_tokens']:g} tokens ({sl['short']['num_examples']} examples); q2_q3: Q2 < n ≤ Q3 = "
            f"{b['q3_tokens']:g} ({sl['q2_q3']['num_examples']}); long: n > Q3 ({sl['long']['num_examples']}); n counts special "
            "tokens. From the stage's own dev evaluation; main metric and relative FLOPs (paper convention) of each slice's rows.")
    header = ["stage"] + [f"{name} {what}" for name in _SLICES for what in ("main", "rel. FLOPs paper")]
    section = _section("Dev by input length (quartiles of dev token counts)", header, rows)
    return section[:2] + [note, ""] + section[2:]  # the note under the title


def _section(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A `## title` Markdown section holding one table."""
    return [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


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
