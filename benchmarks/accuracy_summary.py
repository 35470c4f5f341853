"""One task's accuracy-vs-FLOPs results in one place (not a test): the matched-FLOPs comparison of
LTP, manual thresholds, top-k and ToP from `ltp-compress sweep` (levels: one or more sweeps of one
teacher and split, e.g. the methods' sweep, ToP's and a level added later, each given with --levels; and mean ± sd over seeds at one
level: the seeds sweep's runs pooled with the levels sweep's run at that level), the chain's LTP / KD / INT8 models with their BOPs, and the accuracy issue's goals checked
against them. Reads committed result files only; writes <out>.json, <out>.md and <out>.png. Files that
carry an environment block (pipeline/environment.py) must share one kernel ISA (oneDNN ISA and implementation, AMX / AVX-512 VNNI flags): numerics follow the kernel
that ran (a file without one predates the block and is read: accuracy does not depend on timing).

    python benchmarks/accuracy_summary.py --task mrpc --levels benchmarks/results/mrpc_sweep/sweep.json \\
        --seeds benchmarks/results/mrpc_sweep/seeds_040/sweep.json --chain benchmarks/results/mrpc_minilm/report.json \\
        --out benchmarks/results/accuracy_mrpc

With --ltp-alt (and --ltp-alt-seeds), a second sweep of an LTP variant over the same levels, same
teacher and split (e.g. a longer soft phase; its baseline-stage rows are controls, listed apart):
the variant whose LTP models have the higher mean validation accuracy over the levels both sweeps
ran is the table's LTP, the other is shown beside it. A rule on validation, fixed before the runs.

    python benchmarks/accuracy_summary.py --task sst2 --levels benchmarks/results/sst2_sweep/sweep.json \\
        --seeds benchmarks/results/sst2_sweep/seeds_040/sweep.json \\
        --ltp-alt benchmarks/results/sst2_sweep_long_soft/sweep.json \\
        --ltp-alt-seeds benchmarks/results/sst2_sweep_long_soft/seeds_040/sweep.json \\
        --ltp-label "soft 0.25 epoch" --ltp-alt-label "soft 1 epoch" \\
        --chain benchmarks/results/sst2_minilm/report.json --out benchmarks/results/accuracy_sst2

"LTP" is the ltp_hard stage (binary masks, what deploys); manual_prune, topk_prune and top_prune (ToP)
are the baselines. Every number is dev (the test set) with the validation value that made the choices
beside it; FLOPs and BOPs are measured on dev in the paper's convention.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

METHODS = {"ltp_hard": "LTP", "manual_prune": "manual", "topk_prune": "top-k", "top_prune": "ToP"}
MATCH = 0.01  # methods compare at matched FLOPs: within ±0.01 of the level
# the deeper-pruning issue's goals: LTP within GOAL_DROP points of its teacher at <= GOAL_FLOPS (mean over
# GOAL_SEEDS seeds), LTP + KD + INT8 >= GOAL_BOPS x fewer BOPs than FP16 dense within GOAL_INT8_DROP points
GOAL_DROP, GOAL_FLOPS, GOAL_SEEDS, GOAL_BOPS, GOAL_INT8_DROP = 1.0, 0.30, 3, 16.0, 2.0


def _level(overrides: list[str]) -> float | None:
    """A point's FLOPs level: its hard stage's target_flops override, else the first stage target_flops
    override (a sweep of one method, e.g. ToP's `stages.top.target_flops`)."""
    targets = [(o.split("=", 1)[0], float(o.split("=", 1)[1])) for o in overrides
               if o.startswith("stages.") and o.split("=", 1)[0].endswith(".target_flops")]
    return next((v for k, v in targets if k == "stages.hard.target_flops"), targets[0][1] if targets else None)


def merged_levels_sweeps(paths: list[Path]) -> dict:
    """Several levels sweeps from one teacher and split (e.g. a method or a level added later) as one:
    their rows and summaries together; refused when their unpruned references differ or two of them
    ran the same method at the same level."""
    sweeps = [json.loads(Path(p).read_text()) for p in paths]
    first = sweeps[0]
    seen: dict[tuple, Path] = {}
    for path, sw in zip(paths, sweeps):
        if sw is not first:
            same_reference(first, sw, str(path))
        for r in sw["summary"]:
            if r["stage"] in METHODS:
                key = (_level(r["overrides"]), r["stage"])
                if key in seen:
                    raise SystemExit(f"{path}: {r['stage']} at level {key[0]:.2f} is also in {seen[key]}")
                seen[key] = path
    if len(sweeps) == 1:
        return first
    return {**first, "rows": [r for sw in sweeps for r in sw["rows"]], "summary": [r for sw in sweeps for r in sw["summary"]],
            "failures": [f for sw in sweeps for f in sw.get("failures", [])]}


def sweep_table(sweep: dict, default_level: float | None = None) -> dict[float, dict[str, dict]]:
    """{level: {method: summary row}} from a sweep.json (the level is the hard stage's target)."""
    out: dict[float, dict[str, dict]] = {}
    for r in sweep["summary"]:
        if r["stage"] in METHODS:
            level = _level(r["overrides"]) or default_level
            out.setdefault(level, {})[METHODS[r["stage"]]] = r
    return out


def pooled_seeds_table(seeds_sweep: dict, levels_sweep: dict) -> tuple[dict[float, dict[str, dict]], list[int]]:
    """The seeds sweep's runs pooled with the levels sweep's run at the same level (its seed): mean ± sd,
    for the stages the seeds sweep ran (a method it skipped keeps only its single-seed row)."""
    from ltp_compress.pipeline.sweep import aggregate_over_seeds

    level = next((lv for lv in map(_level, (r["overrides"] for r in seeds_sweep["rows"])) if lv is not None), None)
    stages = {r["stage"] for r in seeds_sweep["rows"]}
    if level is None:  # no target override (e.g. --grid data.split_seed=42): the levels sweep's level its FLOPs landed on
        pruned = [r for r in seeds_sweep["summary"] if r["stage"] in METHODS]
        flops = sum(r["relative_flops_paper"]["mean"] for r in pruned) / max(len(pruned), 1)
        known = sorted({_level(r["overrides"]) for r in levels_sweep["rows"] if r["stage"] in stages} - {None}, key=lambda lv: abs(lv - flops))
        if not pruned or not known or abs(known[0] - flops) > 2 * MATCH:
            raise SystemExit(f"a seeds sweep at relative FLOPs {flops:.3f} sets no level and the levels sweeps ran none within "
                             f"{2 * MATCH} of it: give it a target_flops override")
        level = known[0]
    pooled = [{**r, "point": 0} for r in seeds_sweep["rows"]]
    pooled += [{**r, "point": 0} for r in levels_sweep["rows"] if _level(r["overrides"]) == level
               and r["seed"] not in seeds_sweep["seeds"] and r["stage"] in stages]
    return sweep_table({"summary": aggregate_over_seeds(pooled)}, default_level=level), sorted({r["seed"] for r in pooled})


def pooled_seeds_tables(paths: list[Path], levels_sweep: dict) -> tuple[dict[float, dict[str, dict]], dict[float, list[int]]]:
    """`pooled_seeds_table` of each seeds sweep (one level each): ({level: {method: row}}, {level: seeds})."""
    table, seeds = {}, {}
    for path in paths:
        t, s = pooled_seeds_table(json.loads(Path(path).read_text()), levels_sweep)
        (lv, methods), = t.items()
        if lv in table:  # another method's seeds at the same level (e.g. ToP's, run later) join the row: same seeds, no method twice
            twice = sorted(set(methods) & set(table[lv]))
            if twice or s != seeds[lv]:
                raise SystemExit(f"{path}: a second seeds sweep at level {lv:.2f} with "
                                 + (f"{', '.join(twice)} again" if twice else f"other seeds ({s} vs {seeds[lv]})"))
            methods = {**table[lv], **methods}
        table[lv], seeds[lv] = methods, s
    return table, seeds


def same_reference(a: dict, b: dict, what: str) -> None:
    """Two sweeps compared side by side must share the unpruned reference (same teacher, split, dev)."""
    ra = {(r["validation_main"], r["dev_main"]) for r in a["rows"] if r["is_reference"]}
    rb = {(r["validation_main"], r["dev_main"]) for r in b["rows"] if r["is_reference"]}
    if not ra or ra != rb:
        raise SystemExit(f"{what}: its unpruned reference (validation, dev) {sorted(rb)} is not the levels sweep's {sorted(ra)}: "
                         "sweeps of different teachers or splits cannot share a table")


def choose_ltp(base: dict[float, dict | None], alt: dict[float, dict | None]) -> tuple[str, dict]:
    """The fixed rule: the LTP variant ({level: LTP summary row}) with the higher mean validation accuracy
    over the levels both ran."""
    common = sorted(lv for lv in base if base[lv] is not None and alt.get(lv) is not None)
    vb = sum(base[lv]["validation_main"]["mean"] for lv in common) / max(len(common), 1)
    va = sum(alt[lv]["validation_main"]["mean"] for lv in common) / max(len(common), 1)
    return ("alt" if va > vb else "base"), {"levels": common, "validation_mean_base": vb, "validation_mean_alt": va}


def choose_ltp_per_level(base: dict[float, dict | None], alt: dict[float, dict | None]) -> dict[float, str]:
    """The per-level rule: at each level the variant with the higher mean validation accuracy of those run
    there (a level one of them ran alone is that one's)."""
    picks = {}
    for lv in sorted(set(base) | set(alt)):
        b, a = base.get(lv), alt.get(lv)
        if a is not None or b is not None:
            picks[lv] = "alt" if b is None or (a is not None and a["validation_main"]["mean"] > b["validation_main"]["mean"]) else "base"
    return picks


def chain_rows(report: dict) -> list[dict]:
    rows = []
    for s in report["stages"]:
        m, c = s.get("metrics") or {}, s.get("cost")
        if not c or "validation" not in m:
            continue
        paper = c["by_convention"]["paper"]
        prec = c.get("precision") or {}
        rows.append({"id": s["id"], "stage": s["stage"], "dev": 100 * m["dev"]["main"], "validation": 100 * m["validation"]["main"],
                     "relative_flops_paper": paper["relative_flops"],
                     "bops_reduction_vs_fp16": 1.0 / paper["relative_bops_vs_fp16_dense"],
                     "attention_bits": (prec.get("attn_scores") or [32])[0], "linear_bits": (prec.get("ffn") or [32])[0]})
    return rows


def extra_chain_rows(report: dict, teacher: dict, what: str) -> list[dict]:
    """A chain started from the task chain's teacher (its `evaluate` stage is that model): its trained rows,
    named run/stage; refused unless that evaluate row has the teacher's validation and dev."""
    rows = chain_rows(report)
    refs = [r for r in rows if r["stage"] == "evaluate"]
    if not refs or any(abs(r[k] - teacher[k]) > 1e-6 for r in refs for k in ("validation", "dev")):
        raise SystemExit(f"{what}: its evaluate stage (validation, dev) "
                         f"{[(round(r['validation'], 2), round(r['dev'], 2)) for r in refs] or 'missing'} is not the chain teacher's "
                         f"({teacher['validation']:.2f}, {teacher['dev']:.2f}): a chain from another teacher cannot share the table")
    return [{**r, "id": f"{report['name']}/{r['id']}"} for r in rows if r["stage"] != "evaluate"]


def deep_only_rows(paths: list[Path], labels: list[str], levels_sweep: dict) -> list[dict]:
    """The LTP rows (mean ± sd over their seeds) of sweeps run with a budget of their own, labelled."""
    if len(labels) != len(paths):
        raise SystemExit(f"--deep-only given {len(paths)} time(s) and --deep-only-label {len(labels)}: one label per sweep, in order")
    out = []
    for path, label in zip(paths, labels):
        sw = json.loads(Path(path).read_text())
        same_reference(levels_sweep, sw, str(path))
        for r in sw["summary"]:
            if r["stage"] == "ltp_hard":
                seeds = sorted(r["seeds"])
                level = _level(r["overrides"])
                head = f"{level:.2f}" if level is not None else f"{r['relative_flops_paper']['mean']:.2f}"
                out.append({"label": f"{head} ({label}, seeds {','.join(map(str, seeds))})", "file": str(path), "seeds": seeds,
                            "level": level, "dev": r["dev_main"], "validation": r["validation_main"],
                            "relative_flops_paper": r["relative_flops_paper"]})
    return choose_deep_only_on_validation(out)


def choose_deep_only_on_validation(rows: list[dict]) -> list[dict]:
    """Several own-budget runs at one target level (e.g. soft 1 vs 2 epochs): the one with the higher mean validation
    main metric over its seeds judges the deep goal, the others are shown with `chosen: False` (dev never chooses;
    two variants judged on dev would be a choice on dev)."""
    by_level: dict = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    for group in by_level.values():
        best = max(group, key=lambda r: r["validation"]["mean"])
        for r in group:
            r["chosen"] = r is best
            r["competitors"] = [o["label"] for o in group if o is not r]
    return rows


def check_one_isa(paths: list[Path]) -> None:
    """Every input file measured on one ISA (pipeline/environment.py's check; a file without an
    environment block is accepted: accuracy tables); refuses naming both files otherwise."""
    from ltp_compress.pipeline.environment import EnvironmentMismatch, check_same_isa

    try:
        check_same_isa({str(p): json.loads(Path(p).read_text()).get("environment") for p in paths}, speed=False)
    except EnvironmentMismatch as e:
        raise SystemExit(str(e)) from None


def _fmt(r: dict | None, key: str, scale: float = 100, d: int = 2) -> str:
    if r is None:
        return "-"
    v = r[key]
    return f"{scale * v['mean']:.{d}f} ± {scale * v['sd']:.{d}f}" if v["sd"] else f"{scale * v['mean']:.{d}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--levels", type=Path, action="append", required=True,
                   help="sweep.json over FLOPs levels (one seed); repeatable: sweeps of one teacher and split, e.g. ToP's or a "
                        "level added later (a method at a level in two of them is refused)")
    p.add_argument("--seeds", type=Path, action="append", default=[],
                   help="sweep.json over seeds at one level (repeat the option for more levels)")
    p.add_argument("--ltp-alt", type=Path, action="append", default=[],
                   help="sweep.json of an LTP variant over the same levels, teacher and split; repeatable: sweeps of that one "
                        "variant at other levels (a level in two of them is refused)")
    p.add_argument("--ltp-alt-seeds", type=Path, action="append", default=[],
                   help="that variant's sweep.json over seeds at one level (repeatable)")
    p.add_argument("--ltp-alt-rule", choices=("mean_over_levels", "per_level"), default="mean_over_levels",
                   help="how the table's LTP is chosen between the two: the variant with the higher mean validation accuracy "
                        "over the levels both ran, or at each level the one with the higher validation there (a variant run at "
                        "some levels only); fix it before the runs")
    p.add_argument("--ltp-label", default="levels sweep", help="what the --levels sweep's LTP is (e.g. its soft budget)")
    p.add_argument("--ltp-alt-label", default="variant", help="what the --ltp-alt sweep's LTP is")
    p.add_argument("--chain", type=Path, action="append", required=True,
                   help="report.json of the task's LTP -> KD -> INT8 chain (its finetune stage is the teacher); repeatable: a "
                        "chain started from that teacher (a recipe whose evaluate stage is it, e.g. a deeper target), its rows "
                        "named run/stage")
    p.add_argument("--deep-only", type=Path, action="append", default=[],
                   help=f"sweep.json of LTP runs at <= {GOAL_FLOPS:.2f} FLOPs with a training budget of their own (not the "
                        "baselines'): they judge the deep goal only, in a table of their own, never in the matched-FLOPs comparison")
    p.add_argument("--deep-only-label", action="append", default=[], help="what each --deep-only sweep's LTP is (its budget), in order")
    p.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = p.parse_args(argv)
    check_one_isa([*args.levels, *args.seeds, *args.ltp_alt, *args.ltp_alt_seeds, *args.chain, *args.deep_only])
    from ltp_compress.pipeline.environment import environment_block, environment_summary, loadavg

    load0 = loadavg()

    levels_sweep = merged_levels_sweeps(args.levels)
    levels = sweep_table(levels_sweep)
    seeded, seeded_seeds = pooled_seeds_tables(args.seeds, levels_sweep)

    # an LTP variant (--ltp-alt): chosen on validation, the other shown beside it; controls listed apart
    choice, other, other_seeded, controls = None, {}, {}, []
    if args.ltp_alt:
        def ltp_of(table: dict[float, dict]) -> dict[float, dict | None]:
            return {lv: m.get("LTP") for lv, m in table.items()}

        alt_sweep = merged_levels_sweeps(args.ltp_alt)
        same_reference(levels_sweep, alt_sweep, str(args.ltp_alt[0]))
        for path in args.ltp_alt_seeds:
            same_reference(levels_sweep, json.loads(path.read_text()), str(path))
        alt_seeded, alt_seeds = pooled_seeds_tables(args.ltp_alt_seeds, alt_sweep)
        variants = {"base": (ltp_of(levels), ltp_of(seeded), args.ltp_label),
                    "alt": (ltp_of(sweep_table(alt_sweep)), ltp_of(alt_seeded), args.ltp_alt_label)}
        labels = {"base": args.ltp_label, "alt": args.ltp_alt_label}
        if args.ltp_alt_rule == "mean_over_levels":
            picked, rule = choose_ltp(variants["base"][0], variants["alt"][0])
            picks = {lv: picked for lv in levels}
            choice = {"rule": "mean_over_levels", "chosen": labels[picked], "other": labels["base" if picked == "alt" else "alt"], **rule}
        else:  # per_level: a variant run at some levels only (e.g. a deeper-pruning schedule) competes where it ran
            picks = choose_ltp_per_level(variants["base"][0], variants["alt"][0])
            choice = {"rule": "per_level", "picks": {f"{lv:.2f}": labels[v] for lv, v in sorted(picks.items())}, "other": "other variant"}
        choice["labels"] = labels
        flip = {"base": "alt", "alt": "base"}
        chosen = {lv: variants[picks[lv]][0].get(lv) for lv in picks}
        other = {lv: variants[flip[picks[lv]]][0].get(lv) for lv in picks}
        chosen_seeded = {lv: variants[picks.get(lv, "base")][1].get(lv) for lv in set(seeded) | set(alt_seeded)}
        other_seeded = {lv: variants[flip[picks.get(lv, "base")]][1].get(lv) for lv in chosen_seeded}
        for lv in picks:  # a level only the variant ran
            levels.setdefault(lv, {})
        for lv in alt_seeded:  # a level only the variant has seeds at: its seeds row, the baselines not pooled there
            if picks.get(lv) == "alt" and lv not in seeded:
                seeded[lv], seeded_seeds[lv] = {}, alt_seeds[lv]
        for table, ltp in ((levels, chosen), (seeded, chosen_seeded)):
            for lv in table:
                table[lv] = {**table[lv], "LTP": ltp.get(lv)}
        controls = [{"id": r["id"], "stage": r["stage"], "level": _level(r["overrides"]), "dev": r["dev_main"],
                     "validation": r["validation_main"], "relative_flops_paper": r["relative_flops_paper"]}
                    for r in alt_sweep["summary"] if r["stage"] in METHODS and r["stage"] != "ltp_hard"]
    chain = chain_rows(json.loads(args.chain[0].read_text()))
    teacher = next(r for r in chain if r["stage"] == "finetune")
    for path in args.chain[1:]:
        chain += extra_chain_rows(json.loads(path.read_text()), teacher, str(path))
    deep_only = deep_only_rows(args.deep_only, args.deep_only_label, levels_sweep)
    failures = levels_sweep.get("failures", [])

    # matched-FLOPs comparison, one row per level (and the seeds row)
    comparison = []
    for label, table, seeds in [(f"{lv:.2f}", {lv: levels[lv]}, levels_sweep["seeds"]) for lv in sorted(levels)] + \
                                [(f"{lv:.2f} (seeds {','.join(map(str, seeded_seeds[lv]))})", {lv: seeded[lv]}, seeded_seeds[lv])
                                 for lv in sorted(seeded)]:
        (lv, methods), = table.items()
        row = {"level": lv, "label": label, "seeds": seeds, "methods": {}}
        # a seeds row with baselines stands for its level (below); one of LTP alone judges the deep goal only
        seeded_baselines = len(seeds) > 1 and any(methods.get(n) is not None for n in METHODS.values() if n != "LTP")
        for name in METHODS.values():
            r = methods.get(name)
            one_seed = False
            if r is None and seeded_baselines and name != "LTP" and (levels.get(lv) or {}).get(name) is not None:
                # a baseline run at this level with one seed only: its single value stands in the seeds row (marked),
                # so the level is never judged without it
                r, one_seed = levels[lv][name], True
            if r is None:  # cannot reach the level, or (the chosen LTP variant) not run there
                row["methods"][name] = None
                continue
            flops = r["relative_flops_paper"]["mean"]
            row["methods"][name] = {"dev": r["dev_main"], "validation": r["validation_main"], "relative_flops_paper": r["relative_flops_paper"],
                                    "matched": abs(flops - lv) <= MATCH, "one_seed": one_seed}
        if choice is not None:
            o = (other_seeded if len(seeds) > 1 else other).get(lv)
            row["ltp_other"] = None if o is None else {"dev": o["dev_main"], "validation": o["validation_main"],
                                                        "relative_flops_paper": o["relative_flops_paper"]}
        ltp = row["methods"]["LTP"]
        others = [m for n, m in row["methods"].items() if n != "LTP" and m is not None]
        if ltp is not None and others:
            row["ltp_minus_best_baseline_dev"] = 100 * (ltp["dev"]["mean"] - max(m["dev"]["mean"] for m in others))
            row["ltp_minus_best_baseline_validation"] = 100 * (ltp["validation"]["mean"] - max(m["validation"]["mean"] for m in others))
        comparison.append(row)

    # goals
    def has_baseline(r: dict) -> bool:
        return any(m is not None for n, m in r["methods"].items() if n != "LTP")

    # a seeds row with baselines stands for its level (a seeds row of LTP alone judges only the deep goal)
    seeded_levels = {r["level"] for r in comparison if len(r["seeds"]) > 1 and has_baseline(r)}
    judged = [r for r in comparison if (len(r["seeds"]) > 1 and has_baseline(r)) or (len(r["seeds"]) == 1 and r["level"] not in seeded_levels)]
    deep = []  # LTP at <= GOAL_FLOPS: judged on the mean over >= GOAL_SEEDS seeds; a row with fewer is shown, not judged
    for r in comparison:
        ltp = r["methods"]["LTP"]
        if ltp is not None and ltp["relative_flops_paper"]["mean"] <= GOAL_FLOPS + MATCH:
            drop = teacher["dev"] - 100 * ltp["dev"]["mean"]  # points (the chain reports percent)
            deep.append({"label": r["label"], "seeds": r["seeds"], "dev_drop": drop,
                         "relative_flops_paper": ltp["relative_flops_paper"]["mean"], "judged": len(r["seeds"]) >= GOAL_SEEDS})
    for d in deep_only:  # runs with a budget of their own: they judge this goal, not the matched comparison
        if d["relative_flops_paper"]["mean"] <= GOAL_FLOPS + MATCH:
            deep.append({"label": d["label"], "seeds": d["seeds"], "dev_drop": teacher["dev"] - 100 * d["dev"]["mean"],
                         "relative_flops_paper": d["relative_flops_paper"]["mean"],
                         "judged": len(d["seeds"]) >= GOAL_SEEDS and d["chosen"], "chosen_on_validation": d["chosen"],
                         "own_budget": True})

    def spread(r: dict) -> float | None:  # the largest dev sd (points) of LTP and the best baseline, seeds rows only
        if len(r["seeds"]) < 2 or "ltp_minus_best_baseline_dev" not in r:
            return None
        others = [m for n, m in r["methods"].items() if n != "LTP" and m is not None]
        best = max(others, key=lambda m: m["dev"]["mean"])
        return 100 * max(r["methods"]["LTP"]["dev"]["sd"] or 0.0, best["dev"].get("sd") or 0.0)

    int8 = [r for r in chain if r["stage"] == "quantize"]
    within = [r for r in int8 if teacher["dev"] - r["dev"] <= GOAL_INT8_DROP]
    deep_key, bops_key = f"ltp_within_{GOAL_DROP:g}_point_at_{GOAL_FLOPS:.2f}", f"int8_{GOAL_BOPS:g}x_bops_within_{GOAL_INT8_DROP:g}_points"
    goals = {
        deep_key: {
            "rows": deep, "met": any(d["judged"] and d["dev_drop"] <= GOAL_DROP for d in deep)},
        # a level with a seeds row is judged on it (its single-seed row, one of those seeds, is shown but not judged on its own)
        "ltp_ahead_of_baselines_at_every_level": {
            "levels": {r["label"]: r.get("ltp_minus_best_baseline_dev") for r in judged},
            "spread": {r["label"]: spread(r) for r in judged},
            "not_judged_alone": [r["label"] for r in comparison if r not in judged and len(r["seeds"]) == 1],
            "met": all(r.get("ltp_minus_best_baseline_dev") is not None and r["ltp_minus_best_baseline_dev"] >= 0
                       for r in judged if has_baseline(r))},
        bops_key: {
            "best": None if not within else max(within, key=lambda r: r["bops_reduction_vs_fp16"])["id"],
            "bops_reduction_vs_fp16": None if not within else max(r["bops_reduction_vs_fp16"] for r in within),
            "met": any(r["bops_reduction_vs_fp16"] >= GOAL_BOPS for r in within)},
    }
    result = {"command": "python " + shlex.join([str(Path(sys.argv[0]))] + sys.argv[1:]), "task": args.task,
              "inputs": {"levels": [str(p) for p in args.levels], "seeds": [str(p) for p in args.seeds], "chain": str(args.chain[0]),
                         "ltp_alt": [str(p) for p in args.ltp_alt], "deep_only": [str(p) for p in args.deep_only],
                         "extra_chains": [str(p) for p in args.chain[1:]],
                         "ltp_alt_seeds": [str(p) for p in args.ltp_alt_seeds]},
              "ltp_choice": choice, "controls": controls, "deep_only": deep_only, "teacher": teacher, "comparison": comparison, "chain": chain, "sweep_failures": failures, "goals": goals}

    # markdown
    alt_files = ", ".join(f"`{p}`" for p in args.ltp_alt)
    result["environment"] = environment_block(None, load0)
    L = [f"# {args.task.upper()}: accuracy vs FLOPs, LTP vs {' vs '.join(list(METHODS.values())[1:])}, and the INT8 models", "",
         environment_summary(result["environment"]), "",
         f"command: `{result['command']}`", "",
         "Dev is the test set (nothing was chosen on it); validation (carved from train) made every choice and is given in "
         "brackets. FLOPs / BOPs on dev, paper convention. LTP = the `ltp_hard` model.", "",
         f"Teacher: dev {teacher['dev']:.2f} (validation {teacher['validation']:.2f}).", "",
         "## Matched FLOPs (each method lands the level on validation inputs, same post-pruning budget)", ""]
    if choice is not None and choice["rule"] == "per_level":
        L += [f"LTP: two variants, **{choice['labels']['base']}** (`{args.levels[0]}`) and **{choice['labels']['alt']}** "
              f"({alt_files}). The rule (`--ltp-alt-rule per_level`; when it was fixed: the recipe or docs/results.md): at each level the variant with the higher mean validation "
              "accuracy of those run there is the table's LTP (" + ", ".join(f"{k}: {v}" for k, v in choice["picks"].items())
              + "); the other variant is the last LTP column.", ""]
    elif choice is not None:
        L += [f"LTP: two variants over the same levels, teacher and split: **{choice['labels']['base']}** (`{args.levels[0]}`) and "
              f"**{choice['labels']['alt']}** ({alt_files}). The rule, fixed before the runs: the variant with the higher mean "
              f"validation accuracy over the levels both ran ({', '.join(f'{lv:.2f}' for lv in choice['levels'])}) is the table's LTP: "
              f"{choice['labels']['base']} {100 * choice['validation_mean_base']:.2f}, {choice['labels']['alt']} "
              f"{100 * choice['validation_mean_alt']:.2f} → **{choice['chosen']}**; {choice['other']} is the last LTP column. "
              "Where the chosen variant has no run at a level, the LTP cell says so.", ""]
    other_head = f" | LTP, {choice['other']}, dev (val)" if choice else ""
    names = list(METHODS.values())
    L += ["A cell says *not run* where no input ran that method at that level (top-k and ToP, a top-k rule when deployed, "
          "cannot go below their floor; the sweeps' recipes say which levels each ran). In a seeds row with baselines, a baseline "
          "run at that level with one seed only stands in with that one value, marked (so a seeds row never judges a level "
          "without it).", "",
          "| level | " + " | ".join(f"{n} dev (val)" for n in names) + f" | rel. FLOPs {' / '.join(names)} | LTP − best baseline, dev (val)"
          + other_head + " |", "|---|" + "---|" * (len(names) + 2) + ("---|" if choice else "")]
    for r in comparison:
        cells = []
        for name in METHODS.values():
            m = r["methods"][name]
            cells.append("not run" if m is None else f"{_fmt(m, 'dev')} ({_fmt(m, 'validation')})"
                         + (f" (seed {levels_sweep['seeds'][0]} only)" if m.get("one_seed") else ""))
        fl = " / ".join("-" if r["methods"][n] is None else _fmt(r["methods"][n], "relative_flops_paper", 1, 3)
                        + ("" if r["methods"][n]["matched"] else " (unmatched)") for n in METHODS.values())
        diff = "-" if "ltp_minus_best_baseline_dev" not in r else \
            f"{r['ltp_minus_best_baseline_dev']:+.2f} ({r['ltp_minus_best_baseline_validation']:+.2f})"
        if choice is not None:
            o = r.get("ltp_other")
            diff += " | " + ("not run" if o is None else f"{_fmt(o, 'dev')} ({_fmt(o, 'validation')}) at {_fmt(o, 'relative_flops_paper', 1, 3)}")
        L.append(f"| {r['label']} | " + " | ".join(cells) + f" | {fl} | {diff} |")
    if controls:
        L += ["", f"Controls run in {alt_files} (what each is: that recipe's comments), beside the table's LTP at the level:", "",
              "| control | level | dev (val) | rel. FLOPs | table's LTP dev (val) |", "|---|---|---|---|---|"]
        for c in controls:
            ltp = next((r["methods"]["LTP"] for r in comparison if r["level"] == c["level"] and len(r["seeds"]) == 1), None)
            L.append(f"| {c['id']} ({c['stage']}) | {c['level']:.2f} | {_fmt(c, 'dev')} ({_fmt(c, 'validation')}) | "
                     f"{_fmt(c, 'relative_flops_paper', 1, 3)} | " + ("-" if ltp is None else f"{_fmt(ltp, 'dev')} ({_fmt(ltp, 'validation')})") + " |")
    if deep_only:
        L += ["", f"## LTP at ≤ {GOAL_FLOPS:.2f} FLOPs with a training budget of its own (not a matched comparison)", "",
              "These runs judge the deep goal only: their budget is not the baselines', so they are not in the table above. "
              "Where several ran at one level, the one with the higher mean validation judges the goal; the others are shown.", "",
              "| LTP run | dev (val) | dev − teacher dev | rel. FLOPs | judges the goal | file |", "|---|---|---|---|---|---|"]
        for d in deep_only:
            judges = "yes" if d["chosen"] else "no (lower validation)"
            L.append(f"| {d['label']} | {_fmt(d, 'dev')} ({_fmt(d, 'validation')}) | {100 * d['dev']['mean'] - teacher['dev']:+.2f} | "
                     f"{_fmt(d, 'relative_flops_paper', 1, 3)} | {judges} | `{d['file']}` |")
    for f in failures:
        L += ["", f"Point {f['point']} ({' '.join(f['overrides'])}) stopped: {' '.join(f['error'].split())}"]
    L += ["", "## The chain (one seed): LTP, KD, INT8", "",
          "| model | dev (val) | dev − teacher dev | rel. FLOPs | linear / attention bits | BOPs vs FP16 dense |", "|---|---|---|---|---|---|"]
    for r in chain:
        red = r["bops_reduction_vs_fp16"]
        bops = f"{red:.1f}x fewer" if red >= 1 else f"{1 / red:.1f}x more"
        L.append(f"| {r['id']} ({r['stage']}) | {r['dev']:.2f} ({r['validation']:.2f}) | {r['dev'] - teacher['dev']:+.2f} | "
                 f"{r['relative_flops_paper']:.3f} | {r['linear_bits']} / {r['attention_bits']} | {bops} |")
    g = goals
    L += ["", "## Goals", ""]
    a = g[deep_key]
    rows = "; ".join(f"{d['label']}: dev − teacher {-d['dev_drop']:+.2f} at {d['relative_flops_paper']:.3f}"
                     + ("" if d["judged"] else f" ({len(d['seeds'])} seed{'s' if len(d['seeds']) > 1 else ''}: not judged)")
                     for d in a["rows"]) or "no LTP run at these FLOPs"
    L.append(f"- LTP ≤ {GOAL_DROP:g} point below the teacher at ≤ {GOAL_FLOPS:.2f} FLOPs, mean over {GOAL_SEEDS} seeds: "
             f"**{'met' if a['met'] else 'missed'}** ({rows})")
    b = g["ltp_ahead_of_baselines_at_every_level"]
    alone = f"; at {', '.join(b['not_judged_alone'])} the seeds row stands for the level" if b["not_judged_alone"] else ""

    def gap(k: str, v: float | None) -> str:
        sd = b["spread"].get(k)
        return f"{k}: " + ("-" if v is None else f"{v:+.2f}") + ("" if sd is None or v is None else
                                                                  f" ({'within' if abs(v) <= sd else 'beyond'} a seed's spread, sd {sd:.2f})")
    L.append(f"- LTP ≥ {', '.join(names[1:])} at every level (dev; mean over seeds where there are several): **" + ("met" if b["met"] else "missed")
             + "** (" + ", ".join(gap(k, v) for k, v in b["levels"].items()) + alone + ")")
    c = g[bops_key]
    best = "none" if c["best"] is None else f"{c['best']} {c['bops_reduction_vs_fp16']:.1f}x"
    L.append(f"- LTP + KD + INT8 ≥ {GOAL_BOPS:.0f}x fewer BOPs than FP16 dense at ≤ {GOAL_INT8_DROP} points drop: "
             f"**{'met' if c['met'] else 'missed'}** (best within the drop: {best})")
    L += ["", f"![accuracy vs FLOPs]({args.out.name}.png)", ""]

    # plot
    from ltp_compress.fileio import atomic_write_json, atomic_write_text
    from ltp_compress.pipeline.plots import STYLE, _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for stage, name in METHODS.items():
        pts = sorted((r["methods"][name]["relative_flops_paper"]["mean"], 100 * r["methods"][name]["dev"]["mean"],
                      100 * r["methods"][name]["dev"]["sd"]) for r in comparison if r["methods"][name] is not None)
        if pts:
            label, fmt = STYLE.get(stage, (name, "x-"))
            ax.errorbar([q[0] for q in pts], [q[1] for q in pts], yerr=[q[2] for q in pts], fmt=fmt, label=label, capsize=2)
    markers = iter("*PXDv^<>hp")
    for r in chain:
        if r["stage"] == "quantize":
            ax.plot(r["relative_flops_paper"], r["dev"], next(markers, "*"), color="black", ms=8, ls="none",
                    label=f"chain {r['id']}: {r['bops_reduction_vs_fp16']:.1f}x fewer BOPs")
    ax.axhline(teacher["dev"], color="gray", lw=1, ls=":", label="teacher")
    ax.axhline(teacher["dev"] - GOAL_DROP, color="red", lw=0.8, ls=":", label="teacher - 1 point")
    ax.set_xlabel("relative FLOPs on dev (paper convention)")
    ax.set_ylabel(f"{args.task} dev main metric (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, args.out.with_suffix(".png"))
    plt.close(fig)
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(L))
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
