"""The benchmark's inputs: the dev set tokenised once by the model's tokenizer and cut into the same
length-bucketed, dynamically padded batches for every system, calibration batches, the quantisation
settings of the run; `BenchInputs` carries them (picklable: sent to spawn children)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ltp_compress.manifest import MANIFEST_FILE
from ltp_compress.modeling.checkpoint_format import read_checkpoint_info
from ltp_compress.pipeline.peers.common import BenchError
from ltp_compress.pipeline.run_dir import RunDir
from ltp_compress.sequence_length import DEFAULT_MAX_SEQ_LENGTH

TOKENIZATION = ("outside the timed region: the dev set is tokenised once, before any system is built, and every "
                "system receives the same pre-tokenised, pre-padded int64 batches")


@dataclass
class BenchInputs:
    """Everything a system run needs; picklable (sent to spawn children)."""

    task: str
    models: dict
    batches: dict  # bs -> list[Batch]
    calibration: list  # list[Batch]
    calibration_source: str
    labels: list
    threads: int
    repeats: int
    max_seq_length: int
    pad_token_id: int
    quant: dict  # observer / percentile for dense_int8 (from the run's quantize stage)
    backend: str = "auto"
    profile_bs: int | None = 32
    gemm_bench_json: str | None = None
    work_dir: str | None = None  # exported / quantised artifacts (ONNX files) shared by the systems of one run
    extra: dict = field(default_factory=dict)
    environment: dict | None = None  # the parent's environment block (pipeline/environment.py): gemm_bench.json must match it


def load_inputs(models: dict, data_dir: Path, task_name: str, batch_sizes, max_examples, threads, repeats,
                 calibration_batches: int, calibration_batch_size: int, backend: str, profile_bs, gemm_bench_json,
                 work_dir: str | None = None) -> tuple[BenchInputs, dict]:
    import torch

    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, split_file, tokenize_split
    from ltp_compress.modeling.model_io import load_tokenizer
    from ltp_compress.tasks.glue import get_task

    torch.set_num_threads(threads)
    try:
        task = get_task(task_name)
    except ValueError as e:
        raise BenchError(f"--task: {e}") from None
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BenchError(f"{data_dir}: not a folder (expected a GLUE-format folder with dev.tsv)")
    src = next((models[k] for k in ("int8", "teacher", "hard") if models.get(k) and Path(models[k]).is_dir()), None)
    if not src:
        raise BenchError("no model to benchmark")
    ltp = None
    if models.get("int8") and (Path(models["int8"]) / MANIFEST_FILE).is_file():
        ltp = read_checkpoint_info(models["int8"])  # a malformed checkpoint is named before anything loads from it
    tok = load_tokenizer(src)
    max_seq = DEFAULT_MAX_SEQ_LENGTH
    quant = {"observer": "minmax", "percentile": None, "fuse_gelu": True}
    if ltp is not None:
        max_seq = ltp.max_seq_length
        q = ltp.quantization
        # fuse_gelu: some FFN kernel of the checkpoint applies the GELU (every ltp.json lists fused_gelu)
        quant.update(observer=q.observer or "minmax", percentile=q.percentile, fuse_gelu=q.fuse_gelu)
    elif models.get("run_dir"):
        max_seq = int(RunDir(Path(models["run_dir"])).recipe().get("data", {}).get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
    stage_cfg = models["int8_stage"].config if models.get("int8_stage") else {}
    if stage_cfg:
        quant["observer"] = stage_cfg.get("observer", quant["observer"])
        quant["percentile"] = stage_cfg.get("percentile", quant["percentile"])
        quant["fuse_gelu"] = stage_cfg.get("fuse_gelu", quant["fuse_gelu"])
    cfg = DataConfig(source="glue_dir", path=str(data_dir), max_seq_length=max_seq, max_dev_examples=max_examples,
                     max_train_examples=calibration_batches * calibration_batch_size * 4)
    dev = load_split(cfg, task, "dev")
    ts = tokenize_split(dev, tok, max_seq, num_labels=task.num_labels)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = {int(bs): length_bucketed_batches(ts, int(bs), shuffle=False, seed=0, pad_token_id=pad) for bs in batch_sizes}
    train_path = split_file(cfg, task, "train")
    if train_path is not None and train_path.is_file():
        tr = tokenize_split(load_split(cfg, task, "train", seed=0), tok, max_seq, num_labels=task.num_labels)
        calib = length_bucketed_batches(tr, calibration_batch_size, shuffle=True, seed=0, pad_token_id=pad)[:calibration_batches]
        calib_src = f"{train_path}: {len(calib)} shuffled length-bucketed batches of {calibration_batch_size}"
    else:
        calib = length_bucketed_batches(ts, calibration_batch_size, shuffle=True, seed=0, pad_token_id=pad)[:calibration_batches]
        calib_src = f"DEV data ({dev.source}; no train file found): {len(calib)} batches of {calibration_batch_size} - calibration overlaps the evaluation set"
    inp = BenchInputs(task=task_name, models={k: models.get(k) for k in ("teacher", "hard", "int8")}, batches=batches,
                      calibration=calib, calibration_source=calib_src, labels=list(ts.labels), threads=threads,
                      repeats=repeats, max_seq_length=max_seq, pad_token_id=int(pad), quant=quant, backend=backend,
                      profile_bs=profile_bs, gemm_bench_json=str(gemm_bench_json) if gemm_bench_json else None,
                      work_dir=work_dir)
    meta = {"dev_source": dev.source, "examples": len(ts), "mean_tokens": float(ts.lengths.mean()),
            "max_tokens": int(ts.lengths.max()), "max_seq_length": max_seq, "calibration": calib_src,
            "quant_config_for_dense_int8": quant, "tokenization": TOKENIZATION}
    return inp, meta
