"""Several processes (`accelerate launch`, `torchrun`): process group setup, who writes, collectives
the stages use, how a global batch is split over ranks, and a clear failure instead of a hang.

Conventions (one place):

* **`batch_size` is global.** A recipe means the same on 1 or N processes: the global batches are
  built exactly as on one process (`common.train_batches`, seeded by the epoch) and every rank
  takes a contiguous 1/N of each one (`local_part`). An epoch therefore covers the training set
  exactly once on any N, and the schedule (total steps, warmup, evaluation points, checkpoints)
  counts global steps. `batch_size` must be divisible by N (an error naming the key otherwise);
  the epoch's last, smaller batch is split as evenly as it goes and every rank's loss is weighted
  by its share (`LocalBatch.example_weight` / `token_weight`), so DDP's gradient *average* equals
  the gradient of the global batch mean. A rank whose share is empty (a last batch smaller than
  N) runs one example with weight 0: DDP needs the same number of forward/backward passes on
  every rank.
* **Rank 0 writes** (stage folders, models, checkpoints, logs, reports); the others wait at a
  barrier. Decisions from probes (λ steering, FLOPs calibration, threshold re-fits) are made on
  rank 0 and broadcast (`decide_on_main`).
* **Failures**: the process group timeout is `LTP_DIST_TIMEOUT_S` seconds (default 900, instead of
  torch's 30 min); a rank whose stage raises prints its rank and traceback and exits at once
  (`fail_rank`), so the launcher stops the others instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from ltp_compress.errors import UserError

#: seconds a collective may wait for the other ranks before the run fails
ENV_TIMEOUT = "LTP_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900
#: test-only negative control: "1" trains without gradient all-reduce (DDP no_sync)
ENV_NO_GRAD_SYNC = "LTP_DEBUG_NO_GRAD_SYNC"
#: debug: a folder where every rank writes the example indices it trained on / evaluated (JSON)
ENV_RECORD_DIR = "LTP_DEBUG_RECORD_DIR"
#: test-only fault injection: "STAGE_ID:STEP[:RANK]" raises right after that global step
ENV_FAIL_AT = "LTP_DEBUG_FAIL_AT"


def _timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{ENV_TIMEOUT}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise UserError(f"{ENV_TIMEOUT}={raw!r}: must be > 0")
    return value


def launched_world_size() -> int:
    """Processes the launcher started (WORLD_SIZE), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def use_cpu() -> bool:
    """Processes run on CPU (gloo): no CUDA here, or ACCELERATE_USE_CPU set."""
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def init_state():
    """accelerate's process state, created once per process with our timeout (also for 1 process).
    With several processes on CPU it selects gloo (accelerate needs `cpu=True` for that)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu() if launched_world_size() > 1 else False, timeout=timedelta(seconds=_timeout_s()))


def process_group_kwargs() -> list:
    """kwargs_handlers for `Accelerator`: the same timeout (ignored when the state already exists)."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=timedelta(seconds=_timeout_s()))]


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def decide_on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only and hand its (picklable) result to every rank. `fn` must not use
    collectives. A failure on rank 0 is raised there; the other ranks are stopped by `fail_rank`."""
    if not _active():
        return fn(*args, **kwargs)
    result = fn(*args, **kwargs) if is_main() else None
    return broadcast_object(result)


def all_gather_objects(obj) -> list:
    if not _active():
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    """Where tensors for collectives must live: the process's GPU under NCCL, else CPU (gloo)."""
    if "nccl" in str(torch.distributed.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(x: float) -> float:
    if not _active():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def check_identical(values, what: str) -> None:
    """Raise if `values` (a tensor or list of floats) differ between ranks (bitwise)."""
    if not _active():
        return
    mine = [float(v) for v in (values.detach().cpu().flatten().tolist() if torch.is_tensor(values) else values)]
    every = all_gather_objects(mine)
    if any(v != every[0] for v in every):
        raise RuntimeError(f"{what} differ between ranks: " + "; ".join(f"rank {r}: {v}" for r, v in enumerate(every)))


def sync_float_attrs_max(modules: dict[str, object], attr: str) -> None:
    """Set the float attribute `attr` of every module to its maximum over ranks (QAT activation
    ranges: the EMA of the global batch max is the max over ranks of the EMAs of the local maxima)."""
    if not _active():
        return
    names = [n for n, m in modules.items() if getattr(m, attr, None) is not None]
    t = torch.tensor([float(getattr(modules[n], attr)) for n in names], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    for n, v in zip(names, t.tolist()):
        setattr(modules[n], attr, v)


# ----------------------------------------------------------------------------- batches


def check_batch_size(batch_size: int, key: str) -> None:
    """`batch_size` is global: it must split evenly over the processes."""
    n = world_size()
    if batch_size % n:
        raise UserError(f"{key} = {batch_size} is not divisible by the {n} processes: batch_size is the global batch "
                        f"(each process takes batch_size / {n} examples); use a multiple of {n}")


@dataclass
class LocalBatch:
    """This rank's part of a global batch, with the loss weights that make DDP's gradient average
    equal the gradient of the global batch's mean loss."""

    batch: object  # tasks.data.Batch (rows of the global batch, padding trimmed)
    example_weight: float  # N · examples here / examples in the global batch (0: placeholder row)
    token_weight: float  # N · real tokens here / real tokens in the global batch


def local_part(batch) -> LocalBatch:
    """Rank r's contiguous share of a global batch (np.array_split: sizes differ by at most one)."""
    n = world_size()
    if n == 1:
        return LocalBatch(batch, 1.0, 1.0)
    from ltp_compress.tasks.data import Batch

    b = len(batch)
    rows = np.array_split(np.arange(b), n)[rank()]
    empty = len(rows) == 0
    if empty:
        rows = np.array([0])
    sel = torch.as_tensor(rows, dtype=torch.long)
    mask = batch.attention_mask[sel]
    width = max(1, int(mask.sum(1).max()))
    part = Batch(batch.input_ids[sel, :width], mask[:, :width], batch.token_type_ids[sel, :width], batch.labels[sel], batch.index[sel])
    if empty:
        return LocalBatch(part, 0.0, 0.0)
    tokens_all = float(batch.attention_mask.sum())
    return LocalBatch(part, n * len(rows) / b, n * float(mask.sum()) / tokens_all)


def real_indices(local: LocalBatch) -> list[int]:
    """Example indices this rank trained on (none for a weight-0 placeholder)."""
    return [] if local.example_weight == 0 else [int(i) for i in local.batch.index]


def grad_sync_disabled() -> bool:
    return os.environ.get(ENV_NO_GRAD_SYNC, "") not in ("", "0")


# ----------------------------------------------------------------------------- debugging and failures


class IndexRecorder:
    """Records, per rank, the example indices trained on (per epoch) and evaluated (per evaluation
    call, with the metrics the rank computed), and
    writes them to `$LTP_DEBUG_RECORD_DIR/<stage>-rank<r>.json` (tests check coverage and
    disjointness). Does nothing when the variable is unset."""

    def __init__(self, stage_id: str):
        folder = os.environ.get(ENV_RECORD_DIR) if stage_id else None
        self.path = Path(folder) / f"{stage_id}-rank{rank()}.json" if folder else None
        self.data = {"rank": rank(), "world_size": world_size(), "train": {}, "eval": []}

    def train(self, epoch: int, indices: list[int]) -> None:
        if self.path is not None:
            self.data["train"].setdefault(str(epoch), []).extend(indices)

    def eval(self, split: str, indices: list[int], metrics: dict) -> None:
        """One evaluation call: the indices this rank ran and the metrics it computed (gathered)."""
        if self.path is not None:
            self.data["eval"].append({"split": split, "indices": indices, "metrics": metrics})

    def write(self) -> None:
        if self.path is not None:
            from ltp_compress.fileio import atomic_write_json

            atomic_write_json(self.path, self.data)


#: the recorder of the stage running in this process (the runner starts and writes it)
_recorder: IndexRecorder | None = None


def start_recording(stage_id: str) -> None:
    global _recorder
    _recorder = IndexRecorder(stage_id)


def finish_recording() -> None:
    global _recorder
    if _recorder is not None:
        _recorder.write()
    _recorder = None


def recorder() -> IndexRecorder:
    """The running stage's recorder (one that records nothing outside the runner)."""
    return _recorder if _recorder is not None else IndexRecorder("")


def maybe_fail(stage_id: str, step: int) -> None:
    """Fault injection for tests ($LTP_DEBUG_FAIL_AT = STAGE_ID:STEP[:RANK])."""
    spec = os.environ.get(ENV_FAIL_AT)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == stage_id and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank()):
        raise RuntimeError(f"{ENV_FAIL_AT}={spec}: injected failure after step {step} of stage {stage_id} on rank {rank()}")


def fail_rank(stage_id: str, exc: BaseException, log=None) -> None:
    """With several processes: report which rank failed and why, then exit this process at once
    (exit code 1). The launcher (torchrun / accelerate launch) then stops the other ranks; ranks on
    other nodes fail after the process group timeout ($LTP_DIST_TIMEOUT_S). One process: returns."""
    if world_size() == 1:
        return
    r, n = rank(), world_size()
    trace = "" if isinstance(exc, UserError) else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    msg = (f"ltp-compress: rank {r} of {n} failed in stage '{stage_id}': {type(exc).__name__}: {exc}\n" + trace
           + f"ltp-compress: rank {r} exits; the launcher stops the other ranks (or they time out after {_timeout_s():.0f} s, "
             f"{ENV_TIMEOUT}). Rerun the same command to resume from the stage's last checkpoint.\n")
    try:
        if log is not None:
            log.error(msg.rstrip())
        else:
            sys.stderr.write(msg)
        for h in getattr(log, "handlers", []):
            h.flush()
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        os._exit(1)

