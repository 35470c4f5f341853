"""Run a recipe: preflight checks, then each stage into its own folder, resumable.

The run folder layout is owned by `pipeline.run_dir.RunDir`. A stage folder appears only by
renaming its complete temporary folder, with meta.json written last, so an interrupted stage
leaves no finished stage behind and a rerun redoes just that stage (resuming from its last
checkpoint when it wrote one, stages/checkpoint.py).

Under `accelerate launch` / `torchrun` every process runs this function; only rank 0 writes (run
folder, recipe.json, logs/run.log, stage folders and their renames, report), the others wait at
barriers and read what rank 0 wrote (the run folder must be on a filesystem every node sees). A
stage that raises on any rank ends that process at once with its rank and traceback
(stages/distributed.py `fail_rank`); the launcher then stops the others.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

from ltp_compress.console import install_known_message_filters
from ltp_compress.fileio import atomic_write_json
from ltp_compress.pipeline.recipe import Recipe, RecipeError, load_recipe, source_stage_index
from ltp_compress.pipeline.run_dir import RunDir, RunError, StageMeta, StageRecord
from ltp_compress.stages import MODEL_STAGES
from ltp_compress.stages.configs import RECIPE_MODEL, current_spelling
from ltp_compress.stages.context import VALIDATION, StageContext, TaskData

__all__ = ["RunError", "preflight", "run_recipe", "load_task_data", "environment_info"]


def preflight(recipe: Recipe, recipe_path: Path) -> tuple[Recipe, list[str]]:
    """Checks that need no compute: data files and the model source."""
    from ltp_compress.modeling.model_io import ModelSourceError, resolve_model_source
    from ltp_compress.tasks.data import check_data_files, resolve_paths
    from ltp_compress.tasks.glue import get_task

    problems = []
    task = get_task(recipe.task)
    data = resolve_paths(recipe.data, recipe_path.parent)
    recipe = recipe.model_copy(update={"data": data})
    problems += [f"data: {p}" for p in check_data_files(data, task)]
    try:
        source = resolve_model_source(recipe.model, recipe_path.parent)
    except ModelSourceError as e:
        problems.append(f"model: {e}")
    else:
        problems += _validation_overlap_problems(recipe, source)
    return recipe, problems


def _validation_overlap_problems(recipe: Recipe, model_source: str) -> list[str]:
    """A recipe starting from a stage model of another run (`<run>/stages/NN-id/model`) on the same
    data must carve the same validation split: otherwise its validation rows include rows that model
    trained on, and every choice made on them is biased (a seed sweep from a fixed teacher does this
    unless data.split_seed pins the teacher run's seed)."""
    run_dir = Path(model_source).parent.parent.parent
    old = RunDir(run_dir)
    if Path(model_source).name != "model" or Path(model_source).parent.parent.name != "stages" or not old.is_run():
        return []
    other = old.recipe()
    od = other.get("data") or {}
    if other.get("task") != recipe.task or Path(str(od.get("path"))).resolve() != Path(str(recipe.data.path)).resolve():
        return []
    their_seed = od.get("split_seed") if od.get("split_seed") is not None else other.get("seed")
    ours = recipe.data.row_seed(recipe.seed)
    same = (their_seed == ours and od.get("validation_fraction", 0.1) == recipe.data.validation_fraction
            and od.get("max_validation_examples", 1000) == recipe.data.max_validation_examples)
    if same:
        return []
    return [f"data: the model {model_source} was trained by run {run_dir} on the same data with validation carved by seed "
            f"{their_seed} (fraction {od.get('validation_fraction', 0.1)}, at most {od.get('max_validation_examples', 1000)} rows); "
            f"this run would carve it by seed {ours}, so its validation split would hold rows that model trained on: "
            f"set data.split_seed: {their_seed} (and the same validation_fraction / max_validation_examples)"]


def data_problems(recipe: Recipe, data: TaskData, base_model: str, skip: set[str] = frozenset()) -> list[str]:
    """Checks that need the tokenised inputs but no training, run once the data is loaded and
    before the first stage: a top-k FLOPs target below what its `dense_layers` can reach on its
    calibration inputs (its token counts depend on the lengths only)."""
    from transformers import AutoConfig

    from ltp_compress.modeling.accounting import EncoderShape
    from ltp_compress.stages.prune_baselines import probe_lengths, topk_floor_problem

    problems, shape = [], None
    for i, st in enumerate(recipe.stages):
        if st.stage == "topk_prune" and st.target_flops is not None and st.id not in skip:
            shape = shape or EncoderShape.from_config(AutoConfig.from_pretrained(base_model))
            problem = topk_floor_problem(st, probe_lengths(data, recipe.seed, st), shape)
            if problem:
                problems.append(f"stages[{i}]: {problem}")
    return problems


def _stage_config(st) -> dict:
    return json.loads(st.model_dump_json(by_alias=True))


def _setup_logger(run: RunDir, rank: int = 0) -> logging.Logger:
    """Rank 0: logs/run.log and stderr. Other ranks (several processes): errors on stderr only,
    tagged with the rank (everything else rank 0 logs the same)."""
    log = logging.getLogger(f"ltp_compress.run.{run.path}")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if rank != 0:
        h = logging.StreamHandler(sys.stderr)
        h.setLevel(logging.ERROR)
        h.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        return log
    run.log_file.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(run.log_file), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt)
        log.addHandler(h)
    return log


def environment_info(loadavg_start: list[float] | None = None) -> dict:
    """environment.json (report.json's "environment"): pipeline/environment.py's block (CPU, ISA flags,
    oneDNN's ISA, versions, threads, load average from `loadavg_start` to now) + the packages, device."""
    import importlib.metadata as md

    import torch

    from ltp_compress.pipeline.environment import environment_block, loadavg

    versions = {}
    for pkg in ("torch", "transformers", "tokenizers", "datasets", "accelerate", "safetensors", "torchao", "neural-compressor", "ltp-compress"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        **environment_block(torch.get_num_threads(), loadavg_start if loadavg_start is not None else loadavg()),
        "platform": platform.platform(),
        "packages": versions,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _changed_keys(old: dict, new: dict, model) -> list[str]:
    """Keys of `new` (the JSON dump of the pydantic `model`) that differ from the stored `old`. A key
    `old` lacks (a setting added by a later version) stands for what the code did before it existed:
    its default (e.g. quantize's attention_matmuls, data.split_seed), or, for a setting whose default
    is not the old behaviour, the value its field declares as `json_schema_extra={"absent_means": ...}`
    (quantize's activation_range: 'symmetric'); a key only `old` has is changed; a nested model (the
    recipe's data) is compared the same way."""
    fields = {f.alias or name: (name, f) for name, f in type(model).model_fields.items()}
    changed = sorted(set(old) - set(new))
    for k, v in new.items():
        name, f = fields.get(k, (None, None))
        sub = getattr(model, name) if name else None
        if k in old and hasattr(type(sub), "model_fields") and isinstance(old[k], dict) and isinstance(v, dict):
            same = not _changed_keys(old[k], v, sub)
        elif k in old:
            same = old[k] == v
        else:
            extra = (f.json_schema_extra if f is not None and isinstance(f.json_schema_extra, dict) else None) or {}
            same = f is not None and v == extra.get("absent_means", f.get_default(call_default_factory=True))
        if not same:
            changed.append(k)
    return changed


def _check_resume(run: RunDir, recipe: Recipe, overwrite: bool) -> Path | None:
    """A run folder may be resumed only by the same recipe (finished stages unchanged). Returns
    the folder to move the old run to (with --overwrite), or None; reads only (every rank runs it)."""
    if not run.is_run():
        return None
    old = run.recipe()
    new = json.loads(recipe.model_dump_json(by_alias=True))
    head = {k: v for k, v in new.items() if k != "stages"}
    old_head = {k: v for k, v in old.items() if k != "stages"}
    finished = {r.dir.name: r for r in run.finished()}
    changed = _changed_keys(old_head, head, recipe)
    for i, (st, st_obj) in enumerate(zip(new["stages"], recipe.stages)):
        rec = finished.get(run.stage_dir(i, st["id"]).name)
        if rec is not None and _changed_keys(current_spelling(st["stage"], rec.meta.config), st, st_obj):  # renamed keys are not changes
            changed.append(f"stages[{i}] ({st['id']})")
    expected = {run.stage_dir(i, st["id"]).name for i, st in enumerate(new["stages"])}
    changed += [f"{name} (no longer in the recipe)" for name in sorted(set(finished) - expected)]
    if changed and not overwrite:
        raise RunError(
            f"{run.path} holds a run of a different recipe (changed: {', '.join(changed)}). "
            "Finished work is never overwritten silently: pick another `name`, or pass --overwrite "
            f"(the old folder is kept as {run.path.name}.bak-<time>)."
        )
    if changed:
        return run.path.with_name(f"{run.path.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    return None


def load_task_data(recipe: Recipe, task, tokenizer, log: logging.Logger, *, progress: bool = False) -> tuple[TaskData, dict]:
    """The tokenised splits (through the token cache unless `data.cache: false`; the training split then
    cut to `data.train_shorter_than_quantile` when set), and a summary of them for the report (sizes, mean
    tokens, truncated inputs, how validation was carved, the length filter, the trivial baseline on each
    evaluated split, the cache entry)."""
    from ltp_compress.tasks.data import load_split, mean_tokens
    from ltp_compress.tasks.metrics import trivial_baseline
    from ltp_compress.tasks.splits import load_train_and_validation, train_shorter_than
    from ltp_compress.tasks.token_cache import load_splits_cached

    seed = recipe.data.row_seed(recipe.seed)

    def loader():  # called only when the cache has no entry for these files, tokenizer and settings
        train_split, val_split, carve = load_train_and_validation(recipe.data, task, seed=seed)
        raw = {"train": train_split, VALIDATION: val_split}
        for key in task.dev_keys:
            raw[key] = load_split(recipe.data, task, key, seed=seed)
        return raw, {"validation_carving": carve}

    max_len = recipe.data.max_seq_length
    cache_dir = None
    if recipe.data.cache:
        cache_dir = Path(recipe.data.cache_dir) if recipe.data.cache_dir else Path(recipe.output_dir) / ".token_cache"
    tokenized, info = load_splits_cached(recipe.data, task, tokenizer, seed=seed, cache_dir=cache_dir, loader=loader,
                                         label=task.name, progress=progress, log=log)
    carve = info.extra["validation_carving"]
    summary = {"validation_carving": carve, "max_seq_length": max_len, "splits": {},
               "token_cache": {"path": info.path, "hit": info.hit, "seconds": info.seconds}}
    log.info("token cache: %s (%s, %.1f s)", info.path or "off", "reused" if info.hit else "built", info.seconds)
    quantile = recipe.data.train_shorter_than_quantile
    if quantile is not None:  # after the cache (which holds the whole training split), before any training
        tokenized["train"], summary["train_length_filter"] = train_shorter_than(tokenized["train"], tokenized[VALIDATION], quantile, max_len)
        f = summary["train_length_filter"]
        log.info("train: only examples shorter than %g tokens (the %g quantile of validation token counts): %d of %d kept",
                 f["threshold_tokens"], quantile, f["train_examples_after"], f["train_examples_before"])
    for name, ts in tokenized.items():
        meta = info.split(name)
        truncated = meta["truncated"]
        if name == "train" and quantile is not None and ts.truncated is not None:
            truncated = ts.truncated  # the filter keeps rows shorter than max_seq_length only: none was cut
        row = {"examples": len(ts), "source": meta["source"], "malformed_rows_skipped": meta["skipped"],
               "mean_tokens": mean_tokens(ts), "truncated": truncated}
        if name != "train":
            row["trivial_baseline"] = trivial_baseline(task, tokenized["train"].labels, ts.labels)
        summary["splits"][name] = row
        role = {"train": "trained on", VALIDATION: "chooses"}.get(name, "evaluated only, never chosen on")
        log.info("%s: %d examples (%s), mean %.1f tokens, %d truncated at %d", name, len(ts), role, row["mean_tokens"],
                 row["truncated"], max_len)
    log.info("validation carved from train: %s; %d overlapping training rows dropped",
             carve["method"], carve["dropped_from_train_as_overlapping"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    data = TaskData(train=tokenized["train"], validation=tokenized[VALIDATION], dev={k: tokenized[k] for k in task.dev_keys},
                    pad_token_id=pad, trivial_baseline={k: v["trivial_baseline"] for k, v in summary["splits"].items() if k != "train"})
    return data, summary


def run_recipe(recipe_path: str | Path, overrides: list[str] = (), *, overwrite: bool = False, progress: bool = True,
               stop_after: str | None = None) -> Path:
    """Run (or resume) a recipe. Returns the run directory."""
    install_known_message_filters()  # before torch / transformers print them
    import torch
    from transformers.utils import logging as hf_logging

    from ltp_compress.modeling.model_io import load_tokenizer, model_size_bytes, parameter_count, resolve_model_source
    from ltp_compress.pipeline.report import write_report
    from ltp_compress.stages import stage_function
    from ltp_compress.tasks.glue import get_task

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    recipe, problems = preflight(recipe, recipe_path)
    if problems:
        raise RecipeError(f"{recipe_path}: cannot run:\n" + "\n".join("  " + p for p in problems))
    if stop_after is not None and stop_after not in {s.id for s in recipe.stages}:
        raise RecipeError(f"--stop-after: '{stop_after}' is not a stage id of {recipe_path}")

    from ltp_compress.stages import distributed as dist

    if dist.launched_world_size() > 1:
        dist.init_state()  # the process group (with our timeout) before the first barrier
    main = dist.is_main()
    for i, st in enumerate(recipe.stages):  # batch sizes are global: before any compute, not hours into the run
        if hasattr(st, "batch_size"):
            dist.check_batch_size(st.batch_size, f"{recipe_path}: stages[{i}] ({st.id}).batch_size")
    run = RunDir(Path(recipe.output_dir) / recipe.name)
    backup = _check_resume(run, recipe, overwrite)
    dist.barrier()  # every rank has read the old run before rank 0 moves it
    if main:
        if backup is not None:
            run.path.rename(backup)
        run.path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    log = _setup_logger(run, dist.rank())
    if dist.world_size() > 1:
        log.info("%d processes (%s); batch sizes are global (each process takes 1/%d of every batch)",
                 dist.world_size(), "gloo, CPU" if dist.use_cpu() else "GPUs", dist.world_size())
    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars; stages show their own progress
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    if main:
        atomic_write_json(run.recipe_file, json.loads(recipe.model_dump_json(by_alias=True)))
        run_environment = environment_info()
        atomic_write_json(run.environment_file, run_environment)

    task = get_task(recipe.task)
    base_model = resolve_model_source(recipe.model, recipe_path.parent)
    records: dict[str, StageRecord] = {r.id: r for r in run.finished()}
    data = None
    for i, st in enumerate(recipe.stages):
        if st.id in records:
            log.info("stage %s (%s): already finished, skipped", st.id, st.stage)
        else:
            if data is None:
                if not main:
                    dist.barrier()  # rank 0 builds the token cache first; the others then read it
                data, data_summary = load_task_data(recipe, task, load_tokenizer(base_model), log, progress=progress and main)
                problems = data_problems(recipe, data, base_model, skip=set(records))
                if problems:  # before the first stage runs, not hours into the run
                    raise RecipeError(f"{recipe_path}: cannot run:\n" + "\n".join("  " + p for p in problems))
                if main:
                    dist.barrier()
                    atomic_write_json(run.data_file, data_summary)
            src_i = source_stage_index(recipe, i)
            src_rec = records[recipe.stages[src_i].id] if src_i is not None else None
            source = str(src_rec.model_dir) if src_rec is not None else base_model
            if main:
                tmp, earlier = run.start_stage(i, st.id)
                if earlier == "removed":
                    log.info("stage %s: removing an interrupted attempt %s", st.id, tmp)
                elif earlier == "resumed":
                    log.info("stage %s: an interrupted attempt left a checkpoint in %s: resuming from it", st.id, tmp)
            dist.barrier()
            tmp = run.tmp_dir(i, st.id)
            stage_models = {sid: str(r.model_dir) for sid, r in records.items() if r.model_dir is not None}
            ctx = StageContext(task=task, data=data, out_dir=tmp, final_dir=run.stage_dir(i, st.id), source_model=source,
                               stage_models={**stage_models, RECIPE_MODEL: base_model}, seed=recipe.seed, log=log,
                               max_seq_length=recipe.data.max_seq_length, progress=progress)
            log.info("stage %s (%s): starting from %s", st.id, st.stage, source)
            t0 = time.time()
            dist.start_recording(st.id)  # debug only ($LTP_DEBUG_RECORD_DIR): example indices per rank
            try:
                result = stage_function(st.stage)(st, ctx)
            except BaseException as e:
                dist.fail_rank(st.id, e, log)  # several processes: report the rank, exit now (no hang)
                raise
            dist.finish_recording()
            dist.barrier()  # every rank finished the stage (rank 0 wrote its model)
            if not main:
                dist.barrier()  # rank 0 publishes the stage folder
                records = {r.id: r for r in run.finished()}
                if stop_after == st.id:
                    break
                continue
            meta = {
                "id": st.id, "stage": st.stage, "index": i, "config": _stage_config(st),
                "source_model": source, "source_stage": src_rec.id if src_rec else None,
                "metrics": result.metrics, "cost": result.cost, "extra": result.extra,
                "wall_time_s": time.time() - t0, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if ctx.model_out.is_dir():
                meta["model_size_bytes"] = model_size_bytes(ctx.model_out)
                meta["parameter_count"] = parameter_count(ctx.model_out)
            elif st.stage in MODEL_STAGES:
                raise RunError(f"stage {st.id} ({st.stage}) finished without writing a model")
            records[st.id] = run.publish_stage(i, st.id, StageMeta(**meta))
            log.info("stage %s finished in %.1f s: %s", st.id, meta["wall_time_s"], _brief(records[st.id].meta))
            dist.barrier()
        if stop_after == st.id:
            log.info("stopping after stage %s as asked", st.id)
            break
    if main:
        atomic_write_json(run.environment_file, environment_info(run_environment["loadavg_start"]))  # the load at the end too
        _, report_md = write_report(run.path)
        log.info("report: %s", report_md)
    dist.barrier()
    return run.path


def _brief(meta: StageMeta) -> str:
    parts = []
    for split, m in meta.metrics.items():
        parts.append(f"{split} main={m.get('main', float('nan')):.4f}")
    if meta.cost:
        parts.append(f"relative FLOPs={meta.cost['relative_flops']:.3f}")
    return ", ".join(parts)
