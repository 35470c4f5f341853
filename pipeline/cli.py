"""`ltp-compress` command line. Parses arguments and calls library functions; nothing else."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ltp_compress.console import install_known_message_filters
from ltp_compress.errors import UserError
from ltp_compress.modeling.runtime_choice import RUNTIMES

from ltp_compress.pipeline.arg_types import int_list, positive_int

COMMANDS = ("run", "validate", "report", "schema", "predict", "export", "bench", "sweep", "serve")


def _seed_list(text: str) -> list[int]:
    """--seeds '42,0,1' -> [42, 0, 1]."""
    return int_list(text, what="seed", example="42,0,1", distinct=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ltp-compress",
        description="Learned Token Pruning + distillation + static INT8 for BERT/RoBERTa classifiers. "
                    "`ltp-compress RECIPE.yaml` is short for `ltp-compress run RECIPE.yaml`.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a recipe")
    r.add_argument("recipe", type=Path)
    r.add_argument("overrides", nargs="*", help="key.path=value, e.g. stages.soft.lambda=0.05 or seed=1")
    r.add_argument("--overwrite", action="store_true", help="move an existing run of a different recipe aside and start again")
    r.add_argument("--stop-after", metavar="STAGE_ID", help="stop after this stage (resume later)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    v = sub.add_parser("validate", help="validate a recipe (schema, cross-stage rules, data files) without running")
    v.add_argument("recipe", type=Path)
    v.add_argument("overrides", nargs="*")
    rp = sub.add_parser("report", help="(re)write and print a run's report")
    rp.add_argument("run_dir", type=Path)
    sub.add_parser("schema", help="print the recipe JSON schema (for editor autocompletion)")
    pr = sub.add_parser("predict", help="classify text with a deployable checkpoint")
    pr.add_argument("checkpoint", type=Path)
    pr.add_argument("inputs", nargs="*", help="texts; a pair as 'A ||| B'. Omit to read stdin (one per line)")
    pr.add_argument("--tsv", type=Path, help="TSV file: first column text_a, optional second column text_b")
    pr.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="auto: the table in modeling/runtime_choice.py (onnxruntime for an ONNX export folder; fused for a safetensors checkpoint on an AVX-512 VNNI CPU; else torch)")
    pr.add_argument("--threads", type=positive_int, default=None, help="threads in all (default: the runtime's)")
    pr.add_argument("--streams", type=positive_int, default=1,
                    help="onnxruntime: batches run at once, threads // streams each (throughput; 1 = latency)")
    pr.add_argument("--backend", default="auto", help="INT8 GEMM backend of the torch runtime")
    pr.add_argument("--task", default=None, help="the model's GLUE task (single sentences or pairs), when the checkpoint's run does not say")
    from ltp_compress.pipeline.export_cli import add_export_parser

    add_export_parser(sub)
    pr.add_argument("--batch-size", type=positive_int, default=32)
    from ltp_compress.pipeline.bench_args import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="end-to-end speed and accuracy vs peers on a dev set"))
    from ltp_compress.pipeline.serve_args import add_serve_parser

    add_serve_parser(sub)
    sw = sub.add_parser("sweep", help="run a recipe over a grid of values and plot accuracy vs relative FLOPs")
    sw.add_argument("recipe", type=Path)
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="e.g. stages.soft.lambda=0.01,0.05,0.2 (none: the recipe as it is, e.g. over --seeds)")
    sw.add_argument("--seeds", default=None, type=_seed_list, help="comma-separated seeds; every point runs once per seed, tables give mean ± sd")
    sw.add_argument("--out", type=Path, default=None, help="folder for sweep.json/.md/.png (default: <output_dir>/<name>-sweep)")
    sw.add_argument("--name", default=None, help="prefix of the points' run names (default: the recipe's name): one recipe, "
                                                 "several studies without their runs colliding")
    sw.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv = ["run"] + argv  # short form: ltp-compress RECIPE
    args = _parser().parse_args(argv)
    install_known_message_filters()
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume after the last finished stage", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as e:  # the user's to fix: one paragraph, exit 2 (anything else keeps its traceback)
        print(f"ltp-compress: error: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "run":
        from ltp_compress.pipeline.run_dir import RunDir
        from ltp_compress.pipeline.runner import run_recipe

        run_dir = run_recipe(args.recipe, args.overrides, overwrite=args.overwrite, progress=not args.no_progress, stop_after=args.stop_after)
        print(f"report: {RunDir(run_dir).report_md}")
        return 0
    if args.command == "validate":
        from ltp_compress.pipeline.recipe import RecipeError, load_recipe
        from ltp_compress.pipeline.runner import preflight

        recipe = load_recipe(args.recipe, args.overrides)
        _, problems = preflight(recipe, args.recipe)
        if problems:
            raise RecipeError(f"{args.recipe}: cannot run:\n" + "\n".join("  " + p for p in problems))
        print(f"{args.recipe}: valid ({len(recipe.stages)} stages: {' -> '.join(s.id for s in recipe.stages)})")
        return 0
    if args.command == "report":
        from ltp_compress.pipeline.report import write_report
        from ltp_compress.pipeline.run_dir import RunDir

        RunDir(args.run_dir).recipe()  # a clear error if this is not a run folder
        _, md = write_report(args.run_dir)
        print(md.read_text())
        return 0
    if args.command == "schema":
        from ltp_compress.pipeline.recipe import recipe_json_schema

        print(recipe_json_schema())
        return 0
    if args.command == "export":
        from ltp_compress.pipeline.export_cli import export_cli

        return export_cli(args)
    if args.command == "predict":
        from ltp_compress.pipeline.predict import predict_cli

        return predict_cli(args)
    if args.command == "serve":
        from ltp_compress.pipeline.serve import serve_cli

        return serve_cli(args)
    if args.command == "bench":
        from ltp_compress.pipeline.bench import bench_cli

        return bench_cli(args)
    if args.command == "sweep":
        from ltp_compress.pipeline.sweep import run_sweep

        seeds = args.seeds or None
        out = run_sweep(args.recipe, args.grid, seeds=seeds, out_dir=args.out, name=args.name, progress=not args.no_progress)
        print(f"sweep: {out}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
