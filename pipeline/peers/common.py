"""What every benchmarked system shares: the built `System`, the benchmark's error type, loading the
FP teacher, numpy feeds, checkpoint identity (recipe + sha256) and small helpers."""

from __future__ import annotations

from pathlib import Path

from ltp_compress.errors import UserError
from ltp_compress.manifest import sha256_file
from ltp_compress.modeling.onnx_export import INPUT_NAMES  # the exported graph's input names: one owner

class BenchError(UserError, ValueError):
    """Bad benchmark arguments (missing checkpoint / stage, unknown system)."""


class System:
    """A built system: `logits(batch) -> logits [b, num_labels]` (torch tensor or numpy array).

    Optional, set by a peer module:
      * `run_pass(batches) -> list of logits` runs a whole pass at once (OpenVINO's THROUGHPUT
        hint overlaps requests through an AsyncInferQueue); used for batch sizes > 1;
      * `op_profile(batch) -> dict` the runtime's own profile of one batch (ORT's op types,
        OpenVINO's executed layer types and precisions) instead of the torch profiler."""

    def __init__(self, fn, info: dict | None = None, pad_multiple: int | None = None, *, run_pass=None, op_profile=None,
                 kept_tokens=None, last_layer_rows: str = "all"):
        self.fn = fn
        self.info = info or {}
        self.pad_multiple = pad_multiple
        self.run_pass = run_pass
        self.op_profile = op_profile
        # ours only: `kept_tokens(batch) -> [b, L]` tokens entering each layer when the system runs
        # this batch (what it executes; the bench turns it into the relative FLOPs it really ran at)
        self.kept_tokens = kept_tokens
        # ours only: which of the last layer's rows the runtime runs past QKV (accounting.LAST_LAYER_ROWS)
        self.last_layer_rows = last_layer_rows

    def logits(self, batch):
        ids, mask, tt = batch.input_ids, batch.attention_mask, batch.token_type_ids
        if self.pad_multiple:
            ids, mask, tt = pad_to_multiple(ids, mask, tt, self.pad_multiple, self.info.get("pad_token_id", 0))
        return self.fn(ids, mask, tt)


def pad_to_multiple(ids, mask, tt, multiple: int, pad_id: int):
    import torch.nn.functional as F

    s = ids.shape[1]
    extra = (-s) % multiple
    if not extra:
        return ids, mask, tt
    return (F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0), F.pad(tt, (0, extra), value=0))


def numpy_feed(batch_or_tensors, names=INPUT_NAMES) -> dict:
    """{input name: int64 numpy [b, s]} from a Batch or an (ids, mask, tt) tuple (zero-copy views)."""
    import numpy as np

    if isinstance(batch_or_tensors, tuple):
        vals = batch_or_tensors
    else:
        vals = (batch_or_tensors.input_ids, batch_or_tensors.attention_mask, batch_or_tensors.token_type_ids)
    out = {}
    for n, v in zip(INPUT_NAMES, vals):
        if n in names:
            a = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
            out[n] = a if a.dtype == np.int64 else a.astype(np.int64)
    return out


def load_teacher(inp, attn_implementation: str = "eager"):
    """The FP teacher of `inp.models` as a HF *ForSequenceClassification model (eval mode).
    `attn_implementation`: "eager" (what our pipeline trains with) or "sdpa" (HF's default)."""
    from ltp_compress.modeling.model_io import load_stage_model
    from ltp_compress.tasks.glue import get_task

    if not inp.models.get("teacher"):
        raise BenchError("no FP teacher model available (pass a run directory or --teacher)")
    model, _, _ = load_stage_model(Path(inp.models["teacher"]), get_task(inp.task))
    if attn_implementation != "eager":
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def hf_logits_module(model):
    """nn.Module taking (input_ids, attention_mask, token_type_ids) positionally -> logits."""
    import torch

    class HFLogits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    return HFLogits(model).eval()


def version(dist: str) -> str | None:
    try:
        import importlib.metadata as md

        return md.version(dist)
    except Exception:
        return None


def checkpoint_identity(folder: str | Path | None) -> dict | None:
    """{"path", "recipe", "run_dir", "stage", "files": {model.safetensors / model.onnx: sha256}} of a
    benchmarked model folder; the recipe is named when the folder is a stage of a run folder."""
    if not folder:
        return None
    from ltp_compress.pipeline.run_dir import RunDir

    folder = Path(folder)
    ident: dict = {"path": str(folder), "recipe": None, "run_dir": None, "stage": None, "files": {}}
    run = RunDir.containing_model(folder)
    if run is not None:
        ident["run_dir"], ident["stage"] = str(run.path), folder.parent.name
        try:
            ident["recipe"] = run.recipe().get("name")
        except Exception as e:  # an unreadable recipe.json does not stop the benchmark
            ident["recipe_error"] = f"{run.recipe_file}: {e}"
    for name in ("model.safetensors", "model.onnx"):
        if (folder / name).is_file():
            ident["files"][name] = sha256_file(folder / name)
    return ident
