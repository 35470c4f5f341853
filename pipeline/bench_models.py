"""Which models the end-to-end benchmark runs: a run directory's teacher / hard-pruned / INT8 stages,
or a deployable INT8 checkpoint (with its run's models when it is a stage of one)."""

from __future__ import annotations

from pathlib import Path

from ltp_compress.manifest import MANIFEST_FILE
from ltp_compress.pipeline.peers.common import BenchError
from ltp_compress.pipeline.run_dir import RunDir

PRUNED_FP_STAGES = ("ltp_hard", "distill")  # stages whose model is a hard-pruned FP model (ltp_fp32 can run it)


def resolve_models(checkpoint: str | Path | None = None, *, run_dir: str | Path | None = None,
                   teacher: str | Path | None = None, hard: str | Path | None = None,
                   int8: str | Path | None = None) -> dict:
    """{"teacher": path|None, "hard": path|None, "int8": path|None, "int8_stage": its StageMeta|None,
    "run_dir": path|None, "notes": [...]}.

    `checkpoint` may be a run directory (has stages/) or a deployable INT8 folder (has
    manifest.json); a deployable folder inside a run (runs/X/stages/NN-id/model) also finds its
    run's teacher and hard stages. In a run: teacher = the first ``finetune`` stage, int8 = the
    first ``quantize`` stage, hard = the pruned FP stage that INT8 checkpoint was quantised from
    (``ltp_hard`` or ``distill``, from its meta's source_stage), else the last ``ltp_hard`` stage
    (explicit paths win)."""
    notes: list[str] = []
    paths = {"teacher": None, "hard": None, "int8": None}
    int8_meta = None
    if checkpoint is not None:
        cp = Path(checkpoint)
        if not cp.exists():
            raise BenchError(f"{cp}: not found (expected a run directory or a deployable INT8 checkpoint folder)")
        if (cp / MANIFEST_FILE).is_file():
            paths["int8"] = cp
            containing = RunDir.containing_model(cp)
            if run_dir is None and containing is not None:
                run_dir = containing.path
                notes.append(f"checkpoint is a stage of run {run_dir}: teacher / hard models taken from that run")
            elif run_dir is None:
                notes.append("checkpoint is a standalone deployable folder: no teacher / hard model, only ltp_int8 can run")
        elif RunDir(cp).is_run():
            run_dir = cp
        else:
            raise BenchError(f"{cp}: neither a run directory (recipe.json, stages/) nor a deployable checkpoint ({MANIFEST_FILE})")
    if run_dir is not None:
        run = RunDir(Path(run_dir))
        records = run.finished()
        if not records:
            raise BenchError(f"{run.path}: no finished stages")
        ft = [r for r in records if r.stage == "finetune" and r.model_dir is not None]
        hd = [r for r in records if r.stage == "ltp_hard" and r.model_dir is not None]
        qz = [r for r in records if r.stage == "quantize" and r.model_dir is not None and (r.model_dir / MANIFEST_FILE).is_file()]
        if paths["teacher"] is None and ft:
            paths["teacher"] = ft[0].model_dir
        if paths["hard"] is None and hd:
            paths["hard"] = hd[-1].model_dir
        if paths["int8"] is None and qz:
            paths["int8"], int8_meta = qz[0].model_dir, qz[0].meta
        elif paths["int8"] is not None:
            for r in qz:
                if r.model_dir.resolve() == Path(paths["int8"]).resolve():
                    int8_meta = r.meta
        # the pruned FP model the INT8 checkpoint was quantised from (e.g. a distilled student) is the
        # fair FP counterpart of ltp_int8; the last ltp_hard stage only when the source is unknown
        src = next((r for r in records if int8_meta and r.id == int8_meta.source_stage
                    and r.stage in PRUNED_FP_STAGES and r.model_dir is not None), None)
        if hard is None and src is not None and (not hd or src.model_dir != hd[-1].model_dir):
            paths["hard"] = src.model_dir
            notes.append(f"hard (ltp_fp32) = stage {src.id!r} ({src.stage}), the model the INT8 checkpoint was quantised from")
    for k, v in (("teacher", teacher), ("hard", hard), ("int8", int8)):
        if v is not None:
            paths[k] = Path(v)
    return {**{k: (str(v) if v else None) for k, v in paths.items()}, "int8_stage": int8_meta,
            "run_dir": str(run_dir) if run_dir else None, "notes": notes}
