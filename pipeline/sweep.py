"""`ltp-compress sweep`: run one recipe at several settings and draw accuracy vs relative FLOPs.

Grid: `--grid KEY=V1,V2,...` (repeatable). Keys with several values are zipped, not crossed:
point k sets every key to its k-th value (a key with one value applies to every point). So one
sweep can move LTP's λ, the manual baseline's threshold and the top-k ratio together, giving
one curve per method. Each point is an ordinary, resumable run named `<name>-p<k>` (with several
`--seeds`, `<name>-p<k>-s<seed>`, aggregated as mean ± sd over seeds).

A run that stops on a user error (e.g. a method asked for a FLOPs level it cannot reach) does not end
the sweep: its error is recorded beside the point (sweep.json `failures`, a table in sweep.md), the
stages it finished still give rows, and the next point runs. Any other exception ends the sweep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ltp_compress.errors import UserError
from ltp_compress.pipeline.recipe import RecipeError, load_recipe
from ltp_compress.pipeline.report import collect_report
from ltp_compress.fileio import atomic_write_json, atomic_write_text
from ltp_compress.pipeline.environment import environment_block, environment_summary, loadavg


def _split_top_level(values: str, item: str) -> list[str]:
    """'a,[b,c],{d: 1, e: 2}' -> ['a', '[b,c]', '{d: 1, e: 2}']: commas inside brackets or braces belong to
    one value (a YAML list or mapping); unbalanced brackets are an error naming the --grid item."""
    out, depth, cur = [], 0, []
    for ch in values:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                break
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise RecipeError(f"--grid '{item}': unbalanced brackets")
    out.append("".join(cur))
    return out


def parse_grid(items: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x'] -> [['a=1', 'b=x'], ['a=2', 'b=x']] (override lists per point); a value may be
    a YAML list ('skip_stages=[soft,hard],[]': two values); no items: one point, the recipe as it is (a
    sweep over seeds only)."""
    if not items:
        return [[]]
    keys, values = [], []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--grid '{item}': expected KEY=V1,V2,...")
        k, v = item.split("=", 1)
        vals = [x.strip() for x in _split_top_level(v, item) if x.strip()]
        if not vals:
            raise RecipeError(f"--grid '{item}': no values")
        keys.append(k)
        values.append(vals)
    n = max(len(v) for v in values)
    for k, v in zip(keys, values):
        if len(v) not in (1, n):
            raise RecipeError(f"--grid {k}: {len(v)} values, but other keys have {n} (zipped grids need equal lengths, or one value)")
    return [[f"{k}={v[i] if len(v) > 1 else v[0]}" for k, v in zip(keys, values)] for i in range(n)]


def run_sweep(recipe_path: str | Path, grid: list[str], *, seeds: list[int] | None = None, out_dir: Path | None = None,
              name: str | None = None, progress: bool = True) -> Path:
    """Run every grid point (for every seed in `seeds`, default: the recipe's seed), collect one row
    per point, stage and seed, aggregate mean ± sd over seeds, write sweep.json / .md / .png.
    Runs are named <name>-p<k>[-s<seed>]; `name` defaults to the recipe's."""
    from ltp_compress.pipeline.plots import plot_sweep
    from ltp_compress.pipeline.runner import run_recipe

    recipe_path = Path(recipe_path)
    points = parse_grid(grid)
    base = load_recipe(recipe_path, [f"name={name}"] if name else ())
    seeds = list(seeds) if seeds else [base.seed]
    for overrides in points:  # validate every point before running any
        load_recipe(recipe_path, overrides)
    out_dir = Path(out_dir) if out_dir else Path(base.output_dir) / f"{base.name}-sweep"
    load0 = loadavg()
    rows, failures = [], []
    for k, overrides in enumerate(points):
        for seed in seeds:
            run_name = f"{base.name}-p{k}" + (f"-s{seed}" if len(seeds) > 1 else "")
            run_overrides = overrides + [f"seed={seed}", f"name={run_name}"]
            try:
                run_dir = run_recipe(recipe_path, run_overrides, progress=progress)
            except UserError as e:  # recorded, the stages it finished still count, the sweep goes on
                run_dir = Path(load_recipe(recipe_path, run_overrides).output_dir) / run_name
                failures.append({"point": k, "overrides": overrides, "seed": seed, "run_dir": str(run_dir), "error": str(e)})
                if not (run_dir / "recipe.json").is_file():
                    continue
            rows += sweep_rows(collect_report(run_dir), point=k, overrides=overrides, seed=seed, run_dir=run_dir)
    rows = add_slice_drops(rows)
    summary = aggregate_over_seeds(rows)
    reference = next((r for r in summary if r["is_reference"]), None)
    plot = plot_sweep([r for r in summary if not r["is_reference"]], reference["dev_main"]["mean"] if reference else None,
                      out_dir / "accuracy_vs_flops.png")
    result = {"recipe": str(recipe_path), "grid": grid, "seeds": seeds, "rows": rows, "summary": summary, "failures": failures,
              "plot": str(plot), "environment": environment_block(_threads(base.num_threads), load0)}
    atomic_write_json(out_dir / "sweep.json", result)
    atomic_write_text(out_dir / "sweep.md", render_sweep(result))
    return out_dir


def _threads(recipe_threads: int | None) -> int:
    """The threads the sweep's runs used: the recipe's num_threads, else torch's default."""
    import torch

    return int(recipe_threads or torch.get_num_threads())


#: per-row numbers aggregated over seeds
_VALUES = ("validation_main", "dev_main", "relative_flops_executed", "relative_flops_paper",
           "relative_bops_vs_fp16_executed", "relative_bops_vs_fp16_paper")
#: dev's length slices (stages/length_slices.py), shortest first; rows of runs that have them carry
#: dev_<slice>_main / _relative_flops_paper / _drop and dev_q2_tokens / dev_q3_tokens, aggregated like _VALUES
_SLICES = ("short", "q2_q3", "long")
_SLICE_VALUES = ("dev_q2_tokens", "dev_q3_tokens", *(f"dev_{s}_{v}" for s in _SLICES for v in ("main", "relative_flops_paper", "drop")))


def sweep_rows(report: dict, *, point: int, overrides: list[str], seed: int, run_dir) -> list[dict]:
    """One row per evaluated stage of one run: validation and dev main metric, FLOPs and BOPs (dev)
    in both conventions. The unpruned finetune/evaluate stage is the reference."""
    rows = []
    for s in report["stages"]:
        cost, metrics = s.get("cost"), s.get("metrics") or {}
        if not cost or "validation" not in metrics:
            continue
        dev = next(v for k, v in metrics.items() if k != "validation")
        conv = cost["by_convention"]
        rows.append({"point": point, "overrides": overrides, "seed": seed, "id": s["id"], "stage": s["stage"],
                     "validation_main": metrics["validation"]["main"], "dev_main": dev["main"],
                     "relative_flops_executed": conv["executed"]["relative_flops"], "relative_flops_paper": conv["paper"]["relative_flops"],
                     "relative_bops_vs_fp16_executed": conv["executed"]["relative_bops_vs_fp16_dense"],
                     "relative_bops_vs_fp16_paper": conv["paper"]["relative_bops_vs_fp16_dense"],
                     "is_reference": s["stage"] in ("finetune", "evaluate") and conv["executed"]["relative_flops"] > 0.999,
                     "run_dir": str(run_dir)})
        bl = dev.get("by_length")
        if bl:
            rows[-1].update(dev_q2_tokens=bl["boundaries"]["q2_tokens"], dev_q3_tokens=bl["boundaries"]["q3_tokens"])
            for name in _SLICES:
                sl = bl["slices"][name]
                rows[-1][f"dev_{name}_main"] = (sl.get("metrics") or {}).get("main")
                rows[-1][f"dev_{name}_relative_flops_paper"] = sl["relative_flops"]["paper"]
    return rows


def add_slice_drops(rows: list[dict]) -> list[dict]:
    """Each non-reference row with dev length slices gains dev_<slice>_drop = the same seed's and point's
    unpruned reference's slice main minus its own (positive: below the reference), where both have it."""
    refs = {(r["point"], r["seed"]): r for r in rows if r["is_reference"]}
    for r in rows:
        ref = refs.get((r["point"], r["seed"]))
        if r["is_reference"] or ref is None:
            continue
        for name in _SLICES:
            a, b = ref.get(f"dev_{name}_main"), r.get(f"dev_{name}_main")
            if a is not None and b is not None:
                r[f"dev_{name}_drop"] = a - b
    return rows


def aggregate_over_seeds(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) of every value per (point, stage id)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["point"], r["id"]), []).append(r)
    out = []
    for (point, sid), rs in sorted(groups.items()):
        agg = {"point": point, "id": sid, "stage": rs[0]["stage"], "overrides": rs[0]["overrides"],
               "seeds": [r["seed"] for r in rs], "is_reference": rs[0]["is_reference"]}
        for key in _VALUES + tuple(k for k in _SLICE_VALUES if all(r.get(k) is not None for r in rs)):
            v = np.array([r[key] for r in rs], dtype=np.float64)
            agg[key] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        out.append(agg)
    return out


def render_sweep(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"# Sweep of `{result['recipe']}`", "", f"grid: `{' '.join(result['grid'])}`; seeds {seeds} "
             f"(mean ± sd over seeds{'' if len(seeds) > 1 else '; one seed, sd not available'})", "",
             "Validation made every choice; dev is the test set. FLOPs/BOPs are measured on dev, in both conventions "
             "(executed: what runs; paper: the official LTP code's count).", ""]
    if result.get("environment"):
        lines += [environment_summary(result["environment"]), ""]
    ref = next((r for r in result["summary"] if r["is_reference"]), None)
    if ref is not None:
        lines += [f"unpruned reference: validation {_pm(ref['validation_main'])}, dev {_pm(ref['dev_main'])}", ""]
    lines += ["| method (stage) | point | settings | validation main (%) | dev main (%) | dev drop (points) | rel. FLOPs paper | "
              "rel. FLOPs executed | rel. BOPs vs FP16 (paper) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in result["summary"] if not r["is_reference"]), key=lambda r: (r["stage"], -r["relative_flops_paper"]["mean"])):
        drop = f"{100 * (ref['dev_main']['mean'] - r['dev_main']['mean']):.2f}" if ref is not None else "-"
        lines.append(f"| {r['id']} ({r['stage']}) | {r['point']} | `{' '.join(r['overrides'])}` | {_pm(r['validation_main'])} | "
                     f"{_pm(r['dev_main'])} | {drop} | {_pm(r['relative_flops_paper'], 1, 3)} | {_pm(r['relative_flops_executed'], 1, 3)} | "
                     f"{_pm(r['relative_bops_vs_fp16_paper'], 1, 4)} |")
    if len(seeds) > 1:
        lines += ["", "Per seed: dev main metric and, in brackets, its change vs that seed's own unpruned reference "
                  "(points; negative = below the reference)", "",
                  "| point | stage | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
        refs = {(r["point"], r["seed"]): r["dev_main"] for r in result["rows"] if r["is_reference"]}
        for (point, sid) in sorted({(r["point"], r["id"]) for r in result["rows"] if not r["is_reference"]}):
            cells = []
            for seed in seeds:
                r = next((x for x in result["rows"] if x["point"] == point and x["id"] == sid and x["seed"] == seed), None)
                ref = refs.get((point, seed))
                cells.append("-" if r is None else f"{100 * r['dev_main']:.2f}" + (f" ({100 * (r['dev_main'] - ref):+.2f})" if ref is not None else ""))
            lines.append(f"| {point} | {sid} | " + " | ".join(cells) + " |")
    lines += _by_length_tables(result["summary"])
    if result.get("failures"):
        lines += ["", "Runs that stopped on a user error (the stages they finished are in the tables above):", "",
                  "| point | seed | settings | error |", "|---|---|---|---|"]
        lines += [f"| {f['point']} | {f['seed']} | `{' '.join(f['overrides'])}` | {' '.join(f['error'].replace('|', '/').split())} |" for f in result["failures"]]
    lines += ["", f"![accuracy vs FLOPs]({Path(result['plot']).name})", ""]
    return "\n".join(lines)


def _by_length_tables(summary: list[dict]) -> list[str]:
    """One table per dev length slice (only when the rows have them): dev main and its drop vs the
    same seed's unpruned reference (mean ± sd over seeds), and the slice's relative FLOPs (paper)."""
    rows = [r for r in summary if "dev_short_main" in r]
    if not rows:
        return []
    lines = ["", "## Dev by input length (quartiles of dev token counts)", "",
             f"Each run's dev set cut by its own token-length quartiles (Q2 {_pm(rows[0]['dev_q2_tokens'], 1, 1)}, "
             f"Q3 {_pm(rows[0]['dev_q3_tokens'], 1, 1)} tokens, special tokens included). Drop: the same seed's unpruned "
             "reference minus the stage, in points (positive = below the reference), then mean ± sd over seeds."]
    for name, what in (("short", "n ≤ Q2"), ("q2_q3", "Q2 < n ≤ Q3"), ("long", "n > Q3")):
        lines += ["", f"### {name} ({what})", "", "| method (stage) | point | settings | dev main (%) | drop vs unpruned (points) | "
                  "rel. FLOPs paper |", "|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (not r["is_reference"], r["stage"], r["point"])):
            main, drop = r.get(f"dev_{name}_main"), r.get(f"dev_{name}_drop")
            lines.append(f"| {r['id']} ({r['stage']}{', unpruned' if r['is_reference'] else ''}) | {r['point']} | "
                         f"`{' '.join(r['overrides'])}` | {_pm(main) if main else '-'} | {_pm(drop) if drop else '-'} | "
                         f"{_pm(r[f'dev_{name}_relative_flops_paper'], 1, 3) if r.get(f'dev_{name}_relative_flops_paper') else '-'} |")
    return lines


def _pm(v: dict, scale: float = 100, digits: int = 2) -> str:
    return f"{scale * v['mean']:.{digits}f} ± {scale * v['sd']:.{digits}f}" if v["sd"] else f"{scale * v['mean']:.{digits}f}"
