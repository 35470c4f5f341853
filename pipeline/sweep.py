"""`ltp-compress sweep`: run one recipe at several settings and draw accuracy vs relative FLOPs.

Grid: `--grid KEY=V1,V2,...` (repeatable). Keys with several values are zipped, not crossed:
point k sets every key to its k-th value (a key with one value applies to every point). So one
sweep can move LTP's λ, the manual baseline's threshold and the top-k ratio together, giving
one curve per method. Each point is an ordinary, resumable run named `<name>-p<k>`.
"""

from __future__ import annotations

from pathlib import Path

from ltp_compress.pipeline.recipe import RecipeError, load_recipe
from ltp_compress.pipeline.report import collect_report
from ltp_compress.fileio import atomic_write_json, atomic_write_text


def parse_grid(items: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x'] -> [['a=1', 'b=x'], ['a=2', 'b=x']] (override lists per point)."""
    keys, values = [], []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--grid '{item}': expected KEY=V1,V2,...")
        k, v = item.split("=", 1)
        vals = [x.strip() for x in v.split(",") if x.strip()]
        if not vals:
            raise RecipeError(f"--grid '{item}': no values")
        keys.append(k)
        values.append(vals)
    n = max(len(v) for v in values)
    for k, v in zip(keys, values):
        if len(v) not in (1, n):
            raise RecipeError(f"--grid {k}: {len(v)} values, but other keys have {n} (zipped grids need equal lengths, or one value)")
    return [[f"{k}={v[i] if len(v) > 1 else v[0]}" for k, v in zip(keys, values)] for i in range(n)]


def run_sweep(recipe_path: str | Path, grid: list[str], *, out_dir: Path | None = None, progress: bool = True) -> Path:
    from ltp_compress.pipeline.plots import plot_sweep
    from ltp_compress.pipeline.runner import run_recipe

    recipe_path = Path(recipe_path)
    points = parse_grid(grid)
    base = load_recipe(recipe_path)
    for overrides in points:  # validate every point before running any
        load_recipe(recipe_path, overrides)
    out_dir = Path(out_dir) if out_dir else Path(base.output_dir) / f"{base.name}-sweep"
    rows, reference = [], None
    for k, overrides in enumerate(points):
        run_dir = run_recipe(recipe_path, overrides + [f"name={base.name}-p{k}"], progress=progress)
        report = collect_report(run_dir)
        for s in report["stages"]:
            if not s.get("cost") or not s.get("metrics"):
                continue
            m = next(iter(s["metrics"].values()))
            row = {"point": k, "overrides": overrides, "id": s["id"], "stage": s["stage"], "main": m["main"],
                   "relative_flops": s["cost"]["relative_flops"],
                   "relative_bops_vs_fp16_dense": s["cost"]["relative_bops_vs_fp16_dense"],
                   "mean_tokens_per_layer": s["cost"]["mean_tokens_per_layer"], "run_dir": str(run_dir)}
            if s["stage"] in ("finetune", "evaluate") and s["cost"]["relative_flops"] > 0.999:
                reference = m["main"]
                continue
            rows.append(row)
    plot = plot_sweep(rows, reference, out_dir / "accuracy_vs_flops.png")
    result = {"recipe": str(recipe_path), "grid": grid, "reference_main": reference, "rows": rows, "plot": str(plot)}
    atomic_write_json(out_dir / "sweep.json", result)
    atomic_write_text(out_dir / "sweep.md", render_sweep(result))
    return out_dir


def render_sweep(result: dict) -> str:
    lines = [f"# Sweep of `{result['recipe']}`", "", f"grid: `{' '.join(result['grid'])}`", ""]
    if result["reference_main"] is not None:
        lines += [f"unpruned reference (dev main metric): {100 * result['reference_main']:.2f}", ""]
    lines += ["| method (stage) | point | settings | dev main (%) | drop (points) | relative FLOPs | rel. BOPs vs FP16 |", "|---|---|---|---|---|---|---|"]
    ref = result["reference_main"]
    for r in sorted(result["rows"], key=lambda r: (r["stage"], -r["relative_flops"])):
        drop = f"{100 * (ref - r['main']):.2f}" if ref is not None else "-"
        lines.append(f"| {r['id']} ({r['stage']}) | {r['point']} | `{' '.join(r['overrides'])}` | {100 * r['main']:.2f} | {drop} | {r['relative_flops']:.3f} | {r['relative_bops_vs_fp16_dense']:.4f} |")
    lines += ["", f"![accuracy vs FLOPs]({Path(result['plot']).name})", ""]
    return "\n".join(lines)
