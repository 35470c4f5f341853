"""Step-level checkpoints of a training stage, so a stage killed at step k resumes there and ends
with the same weights as an uninterrupted run (bitwise on CPU).

Written every `checkpoint_every_steps` global steps (a stage config key; 0 = off) by rank 0 into
`<stage tmp folder>/checkpoint/`, built in a temporary sibling and renamed into place
(`fileio.atomic_folder`), so a kill while writing leaves the previous checkpoint intact. Format
(no pickle):

    checkpoint/
        model.safetensors       the model's state dict (unwrapped)
        optimizer.safetensors   optimizer tensors, keyed "<optimizer>/<param index>/<key>"
        tensors.safetensors     stage tensors (thresholds, the keep_best weights as "best/<key>", ...)
        rng.safetensors         every rank's torch (and CUDA) generator state, "rank<r>/torch", "rank<r>/cuda<i>"
        state.json              written last: step, epoch, the stage config it belongs to, world size,
                                optimizer param groups + scalar state, scheduler state, Python / NumPy
                                RNG states per rank, and the loop's own JSON state (λ, history, best score, ...)

The runner keeps an interrupted stage's tmp folder when it holds a checkpoint (`RunDir.start_stage`)
and deletes `checkpoint/` just before the finished stage is renamed into place
(`RunDir.publish_stage`). A checkpoint written for a different stage config (other than
`checkpoint_every_steps`) is ignored (the stage starts over and overwrites it).

Resuming relies on the loops being deterministic given (step, epoch): the global batches of an
epoch come from the epoch seed, so the loop skips the batches before `step`; dropout draws come
from the restored generator state.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ltp_compress.fileio import atomic_folder, atomic_write_json
from ltp_compress.stages import distributed as dist
from ltp_compress.stages.context import CHECKPOINT_DIR, CHECKPOINT_STATE_FILE as STATE_FILE
FORMAT = 1
#: config keys that may change between the interrupted run and the resumed one
_RESUME_NEUTRAL_KEYS = {"checkpoint_every_steps"}


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def _config_key(cfg) -> dict:
    d = json.loads(cfg.model_dump_json(by_alias=True))
    return {k: v for k, v in d.items() if k not in _RESUME_NEUTRAL_KEYS}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _rng_state() -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
            "python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}


def _split_optimizer(name: str, opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}/{idx}/{key}"] = _cpu(v)
            else:
                scalars.setdefault(str(idx), {})[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(name: str, tensors: dict, saved: dict) -> dict:
    state: dict = {}
    for k, v in tensors.items():
        opt_name, idx, key = k.split("/", 2)
        if opt_name == name:
            state.setdefault(int(idx), {})[key] = v
    for idx, st in saved["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = []
    for g in saved["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(out_dir: Path, cfg, *, step: int, epoch: int, model: torch.nn.Module, optimizers: dict, scheduler,
                    tensors: dict[str, torch.Tensor] | None = None, state: dict | None = None) -> None:
    """Collective: every rank calls it (their RNG states are gathered); rank 0 writes."""
    rngs = dist.all_gather_objects(_rng_state())
    if dist.is_main():
        from safetensors.torch import save_file

        with atomic_folder(checkpoint_dir(out_dir), marker=STATE_FILE) as tmp:  # a resume checkpoint replaces the last one
            save_file({k: _cpu(v) for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            opt_tensors, opt_json = {}, {}
            for name, opt in optimizers.items():
                t, j = _split_optimizer(name, opt)
                opt_tensors.update(t)
                opt_json[name] = j
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            save_file({k: _cpu(v) for k, v in (tensors or {}).items()}, str(tmp / "tensors.safetensors"))
            rng_tensors = {}
            for r, st in enumerate(rngs):
                rng_tensors[f"rank{r}/torch"] = _cpu(st["torch"])
                for i, c in enumerate(st["cuda"]):
                    rng_tensors[f"rank{r}/cuda{i}"] = _cpu(c)
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            atomic_write_json(tmp / STATE_FILE, {
                "format": FORMAT, "stage": cfg.id, "config": _config_key(cfg), "step": step, "epoch": epoch,
                "world_size": dist.world_size(), "optimizers": opt_json,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": [{"python": st["python"], "numpy": st["numpy"], "cuda_devices": len(st["cuda"])} for st in rngs],
                "state": state or {}})
    dist.barrier()


@dataclass
class Checkpoint:
    folder: Path
    meta: dict
    tensors: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def epoch(self) -> int:
        return self.meta["epoch"]

    @property
    def state(self) -> dict:
        return self.meta["state"]

    def restore(self, model: torch.nn.Module, optimizers: dict, scheduler) -> None:
        """Weights, optimizer and schedule state, and this rank's generator states."""
        from safetensors.torch import load_file

        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in load_file(str(self.folder / "model.safetensors")).items()})
        opt_tensors = load_file(str(self.folder / "optimizer.safetensors"))
        for name, opt in optimizers.items():
            opt.load_state_dict(_join_optimizer(name, opt_tensors, self.meta["optimizers"][name]))
        if scheduler is not None and self.meta["scheduler"] is not None:
            scheduler.load_state_dict(self.meta["scheduler"])
        self._restore_rng()

    def _restore_rng(self) -> None:
        from safetensors.torch import load_file

        r = dist.rank()
        if r >= len(self.meta["rng"]):
            return  # more ranks than when the checkpoint was written: this rank keeps its seeded state
        rng = load_file(str(self.folder / "rng.safetensors"))
        torch.set_rng_state(rng[f"rank{r}/torch"])
        cuda = [rng[f"rank{r}/cuda{i}"] for i in range(self.meta["rng"][r]["cuda_devices"])]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        py = self.meta["rng"][r]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npy = self.meta["rng"][r]["numpy"]
        np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))


def load_checkpoint(out_dir: Path, cfg, log=None) -> Checkpoint | None:
    """The stage's checkpoint in `out_dir`, or None (none there, or written for another config)."""
    folder = checkpoint_dir(out_dir)
    if not (folder / STATE_FILE).is_file():
        return None
    meta = json.loads((folder / STATE_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("config") != _config_key(cfg):
        if log is not None:
            log.warning("%s: ignoring the checkpoint in %s: it was written for a different configuration of this stage; "
                        "starting the stage over", cfg.id, folder)
        return None
    if meta["world_size"] != dist.world_size() and log is not None:
        log.warning("%s: resuming a checkpoint written by %d processes with %d: same global batches and schedule, "
                    "but dropout draws differ from an uninterrupted run", cfg.id, meta["world_size"], dist.world_size())
    from safetensors.torch import load_file

    return Checkpoint(folder, meta, load_file(str(folder / "tensors.safetensors")))
