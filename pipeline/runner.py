"""Run a recipe: preflight checks, then each stage into its own folder, resumable.

Run directory layout (`<output_dir>/<name>/`):
    recipe.json            resolved recipe (after overrides)
    environment.json       package versions, threads, device
    logs/run.log
    stages/NN-<id>/        one folder per *finished* stage: meta.json (+ model/)
    stages/.tmp-NN-<id>/   a stage in progress; never counted as finished
    report.json, report.md

A stage folder appears only by renaming its complete temporary folder, with meta.json written
last, so an interrupted stage leaves no finished stage behind and a rerun redoes just that stage.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

from ltp_compress.pipeline.recipe import MODEL_STAGES, Recipe, RecipeError, load_recipe, source_stage_index
from ltp_compress.pipeline.state import StageContext, StageRecord, TaskData, atomic_write_json


class RunError(RuntimeError):
    pass


def preflight(recipe: Recipe, recipe_path: Path) -> tuple[Recipe, list[str]]:
    """Checks that need no compute: data files, model source, stage implementations."""
    from ltp_compress import stages as stage_registry
    from ltp_compress.pipeline.data import check_data_files, resolve_paths
    from ltp_compress.pipeline.models import ModelSourceError, resolve_model_source
    from ltp_compress.pipeline.tasks import get_task

    problems = []
    task = get_task(recipe.task)
    data = resolve_paths(recipe.data, recipe_path.parent)
    recipe = recipe.model_copy(update={"data": data})
    problems += [f"data: {p}" for p in check_data_files(data, task)]
    try:
        resolve_model_source(recipe.model, recipe_path.parent)
    except ModelSourceError as e:
        problems.append(f"model: {e}")
    for i, st in enumerate(recipe.stages):
        if not stage_registry.is_implemented(st.stage):
            problems.append(f"stages[{i}] ({st.id}): stage type '{st.stage}' is validated but not implemented in this version")
    return recipe, problems


def stage_dir_name(i: int, sid: str) -> str:
    return f"{i:02d}-{sid}"


def _stage_config(st) -> dict:
    return json.loads(st.model_dump_json(by_alias=True))


def _setup_logger(run_dir: Path) -> logging.Logger:
    log = logging.getLogger(f"ltp_compress.run.{run_dir}")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(run_dir / "logs" / "run.log"), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def environment_info() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "tokenizers", "datasets", "accelerate", "safetensors", "torchao", "neural-compressor", "ltp-compress"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _check_resume(run_dir: Path, recipe: Recipe, overwrite: bool) -> None:
    """A run folder may be resumed only by the same recipe (finished stages unchanged)."""
    saved = run_dir / "recipe.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    new = json.loads(recipe.model_dump_json(by_alias=True))
    head = {k: v for k, v in new.items() if k != "stages"}
    old_head = {k: v for k, v in old.items() if k != "stages"}
    finished = {p.name for p in (run_dir / "stages").glob("[0-9][0-9]-*") if (p / "meta.json").is_file()}
    changed = [k for k in head if head[k] != old_head.get(k)]
    for i, st in enumerate(new["stages"]):
        name = stage_dir_name(i, st["id"])
        if name in finished and json.loads((run_dir / "stages" / name / "meta.json").read_text())["config"] != st:
            changed.append(f"stages[{i}] ({st['id']})")
    expected = {stage_dir_name(i, st["id"]) for i, st in enumerate(new["stages"])}
    changed += [f"{name} (no longer in the recipe)" for name in sorted(finished - expected)]
    if changed and not overwrite:
        raise RunError(
            f"{run_dir} holds a run of a different recipe (changed: {', '.join(changed)}). "
            "Finished work is never overwritten silently: pick another `name`, or pass --overwrite "
            f"(the old folder is kept as {run_dir.name}.bak-<time>)."
        )
    if changed:
        backup = run_dir.with_name(f"{run_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(backup)


def load_task_data(recipe: Recipe, task, tokenizer, log: logging.Logger) -> TaskData:
    from ltp_compress.pipeline.data import load_split, mean_tokens, tokenize_split

    dev = {}
    train_split = load_split(recipe.data, task, "train", seed=recipe.seed)
    train = tokenize_split(train_split, tokenizer, recipe.data.max_seq_length, num_labels=task.num_labels)
    log.info("train: %d examples from %s (%d malformed rows skipped), mean %.1f tokens",
             len(train), train_split.source, train_split.skipped, mean_tokens(train))
    for key in task.dev_keys:
        split = load_split(recipe.data, task, key, seed=recipe.seed)
        dev[key] = tokenize_split(split, tokenizer, recipe.data.max_seq_length, num_labels=task.num_labels)
        log.info("%s: %d examples from %s (%d skipped), mean %.1f tokens", key, len(dev[key]), split.source, split.skipped, mean_tokens(dev[key]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TaskData(train=train, dev=dev, pad_token_id=pad)


def run_recipe(recipe_path: str | Path, overrides: list[str] = (), *, overwrite: bool = False, progress: bool = True,
               stop_after: str | None = None) -> Path:
    """Run (or resume) a recipe. Returns the run directory."""
    import torch

    from ltp_compress.pipeline.models import load_tokenizer, resolve_model_source
    from ltp_compress.pipeline.report import write_report
    from ltp_compress.pipeline.tasks import get_task
    from ltp_compress.stages import stage_function

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    recipe, problems = preflight(recipe, recipe_path)
    if problems:
        raise RecipeError(f"{recipe_path}: cannot run:\n" + "\n".join("  " + p for p in problems))
    if stop_after is not None and stop_after not in {s.id for s in recipe.stages}:
        raise RecipeError(f"--stop-after: '{stop_after}' is not a stage id of {recipe_path}")

    run_dir = Path(recipe.output_dir) / recipe.name
    _check_resume(run_dir, recipe, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = _setup_logger(run_dir)
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    atomic_write_json(run_dir / "recipe.json", json.loads(recipe.model_dump_json(by_alias=True)))
    atomic_write_json(run_dir / "environment.json", environment_info())

    task = get_task(recipe.task)
    base_model = resolve_model_source(recipe.model, recipe_path.parent)
    stages_dir = run_dir / "stages"
    stages_dir.mkdir(exist_ok=True)
    records: dict[str, StageRecord] = {}
    for i, st in enumerate(recipe.stages):
        done = stages_dir / stage_dir_name(i, st.id)
        if (done / "meta.json").is_file():
            records[st.id] = StageRecord(i, st.id, st.stage, done, json.loads((done / "meta.json").read_text()))
    data = None
    for i, st in enumerate(recipe.stages):
        final = stages_dir / stage_dir_name(i, st.id)
        if st.id in records:
            log.info("stage %s (%s): already finished, skipped", st.id, st.stage)
        else:
            if data is None:
                data = load_task_data(recipe, task, load_tokenizer(base_model), log)
            src_i = source_stage_index(recipe, i)
            src_rec = records[recipe.stages[src_i].id] if src_i is not None else None
            source = str(src_rec.model_dir) if src_rec is not None else base_model
            tmp = stages_dir / f".tmp-{stage_dir_name(i, st.id)}"
            if tmp.exists():
                log.info("stage %s: removing an interrupted attempt %s", st.id, tmp)
                shutil.rmtree(tmp)
            tmp.mkdir()
            ctx = StageContext(recipe=recipe, task=task, data=data, run_dir=run_dir, out_dir=tmp, source_model=source,
                               source_record=src_rec, records=dict(records), seed=recipe.seed, log=log, progress=progress,
                               base_model=base_model)
            log.info("stage %s (%s): starting from %s", st.id, st.stage, source)
            t0 = time.time()
            result = stage_function(st.stage)(st, ctx)
            meta = {
                "id": st.id, "stage": st.stage, "index": i, "config": _stage_config(st),
                "source_model": source, "source_stage": src_rec.id if src_rec else None,
                "metrics": result.metrics, "cost": result.cost, "extra": result.extra,
                "wall_time_s": time.time() - t0, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if (tmp / "model").is_dir():
                from ltp_compress.pipeline.models import model_size_bytes

                meta["model_size_bytes"] = model_size_bytes(tmp / "model")
                meta["parameter_count"] = result.extra.get("parameter_count") or _param_count(tmp / "model")
            elif st.stage in MODEL_STAGES:
                raise RunError(f"stage {st.id} ({st.stage}) finished without writing a model")
            atomic_write_json(tmp / "meta.json", meta)
            tmp.rename(final)
            records[st.id] = StageRecord(i, st.id, st.stage, final, meta)
            log.info("stage %s finished in %.1f s: %s", st.id, meta["wall_time_s"], _brief(meta))
        if stop_after == st.id:
            log.info("stopping after stage %s as asked", st.id)
            break
    report_json, report_md = write_report(run_dir)
    log.info("report: %s", report_md)
    return run_dir


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                total += _prod(sf.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _brief(meta: dict) -> str:
    parts = []
    for split, m in (meta.get("metrics") or {}).items():
        parts.append(f"{split} main={m.get('main', float('nan')):.4f}")
    if meta.get("cost"):
        parts.append(f"relative FLOPs={meta['cost']['relative_flops']:.3f}")
    return ", ".join(parts)
