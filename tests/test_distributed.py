"""Several processes (stages/distributed.py): 2 CPU processes with gloo, started by `accelerate launch`
or `torch.distributed.run` as subprocesses (OMP_NUM_THREADS=1 each), against one process.

* with the same global batches (batch_size is global) the 2-process weights and thresholds of
  every training stage type (finetune, ltp_soft with its FLOPs schedule + calibration, ltp_hard with
  threshold re-fits, distill, topk_prune) match the 1-process run within REL_TOL, and the
  metrics (evaluation sharded over the ranks and gathered) are equal;
* the negative control (LTP_DEBUG_NO_GRAD_SYNC=1: DDP no_sync, no all-reduce) misses that
  tolerance by orders of magnitude;
* the ranks trained on disjoint examples covering the training set once per epoch and evaluated
  disjoint parts covering each split once, and computed the same metrics (LTP_DEBUG_RECORD_DIR);
* a rank that fails mid-stage fails the run with its rank in the message: it exits at once
  (`fail_rank`), the launcher names it as the root cause and stops the other rank, and no rank
  waited for the process-group timeout; the rerun resumes from the stage's checkpoint (the
  2-process weights compared with the 1-process run are those of the resumed run).

Tiny model (2 layers, d=32, dropout 0 so that 1 and 2 processes compute the same function), 73
training examples with batch 16: the last batch (9) splits 5/4 with loss weights 10/9 and 8/9.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ltp_compress.pipeline.runner import run_recipe
from ltp_compress.stages import distributed as dist

from conftest import DEMO_DATA, build_tiny_model, write_recipe

#: max over tensors of max|w1 - w2| / max(max|w1|, 1e-2) (a floor, so tensors that stay ~0, like the
#: attention key biases, which get no gradient, are compared in absolute terms)
REL_TOL = 1e-4
THRESHOLD_REL_TOL = 1e-5
TIMEOUT_S = 60  # process-group timeout given to the runs (LTP_DIST_TIMEOUT_S)

TWO_STAGES = """\
  - {id: ft, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3, checkpoint_every_steps: 2}
  - {id: soft, stage: ltp_soft, epochs: 1, batch_size: 16, final_threshold: 2.0, lambda: 0.5, target_flops: 0.7, checkpoint_every_steps: 2,
     flops_controller: annealed_target}
"""
ALL_STAGES = TWO_STAGES + """\
  - {id: hard, stage: ltp_hard, epochs: 1, batch_size: 16, target_flops: 0.7, retargets: 1, retarget_until: 0.4}
  - {id: kd, stage: distill, epochs: 1, batch_size: 16, kd_teacher: ft}
  - {id: topk, stage: topk_prune, init_from: ft, epochs: 1, batch_size: 16, final_keep_ratio: 0.5, dense_layers: 1, checkpoint_every_steps: 2}
"""
FOLDERS = ("00-ft", "01-soft", "02-hard", "03-kd", "04-topk")


def _recipe(folder: Path, model: Path, name: str, stages: str) -> Path:
    return write_recipe(folder / f"{name}.yaml", f"""\
name: {name}
model: {model}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 73, max_dev_examples: 32, max_seq_length: 64}}
seed: 1
output_dir: {folder / 'runs'}
num_threads: 1
stages:
{stages}""")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(recipe: Path, env: dict | None = None, *, launcher: str = "torchrun") -> tuple[subprocess.CompletedProcess, float]:
    """`launcher` "accelerate" (`accelerate launch`; its `--cpu` flag starts one process, so
    `--multi_gpu`: on a machine without usable CUDA the processes run on CPU with gloo) or
    "torchrun" (`python -m torch.distributed.run`, faster to start)."""
    port = _free_port()
    if launcher == "accelerate":
        acc = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [acc, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", port]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd += ["-m", "ltp_compress.pipeline.cli", "run", str(recipe), "--no-progress"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", dist.ENV_TIMEOUT: str(TIMEOUT_S), **(env or {})}
    for k in (dist.ENV_FAIL_AT, dist.ENV_NO_GRAD_SYNC, dist.ENV_RECORD_DIR):
        if k not in (env or {}):
            full_env.pop(k, None)
    t0 = time.time()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=4 * TIMEOUT_S)
    return proc, time.time() - t0


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _weights(run_dir: Path, folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "stages" / folder / "model" / "model.safetensors"))


def _meta(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / "stages" / folder / "meta.json").read_text())


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-2)).item()
               for k in a if a[k].is_floating_point())


def _thresholds(run_dir: Path, folder: str) -> list[float] | None:
    return _meta(run_dir, folder)["extra"]["pruning"].get("thresholds")


def _stable(metrics: dict) -> dict:
    return {s: {k: v for k, v in m.items() if k != "examples_per_s"} for s, m in metrics.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (in this process); two processes (torchrun, recording the example indices) in
    which rank 1 fails after step 3 of the last stage, then the rerun (`accelerate launch`) that
    resumes it from its step-2 checkpoint; two processes without gradient sync (first two stages)."""
    tmp = tmp_path_factory.mktemp("dist")
    model = build_tiny_model(tmp / "tiny")
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(cfg))
    t0 = time.time()
    one = run_recipe(_recipe(tmp, model, "one", ALL_STAGES), progress=False)
    one_s = time.time() - t0
    recipe = _recipe(tmp, model, "two", ALL_STAGES)
    crashed, crash_s = _launch(recipe, {dist.ENV_RECORD_DIR: str(tmp / "record"), dist.ENV_FAIL_AT: "topk:3:1"})
    checkpoint_step = json.loads((tmp / "runs" / "two" / "stages" / ".tmp-04-topk" / "checkpoint" / "state.json").read_text())["step"]
    resumed, resume_s = _launch(recipe, launcher="accelerate")
    _check(resumed)
    nosync, nosync_s = _launch(_recipe(tmp, model, "nosync", TWO_STAGES), {dist.ENV_NO_GRAD_SYNC: "1"})
    _check(nosync)
    print(f"wall: 1 process {one_s:.1f} s; 2 processes: failing run {crash_s:.1f} s, resumed run {resume_s:.1f} s, "
          f"without gradient sync {nosync_s:.1f} s")
    return {"one": one, "two": tmp / "runs" / "two", "nosync": tmp / "runs" / "nosync", "record": tmp / "record",
            "crashed": crashed, "checkpoint_step": checkpoint_step}


def test_two_processes_match_one(runs):
    one, two = runs["one"], runs["two"]
    assert "2 processes (gloo, CPU)" in (two / "logs" / "run.log").read_text()
    for folder in FOLDERS:
        diff = max_rel_diff(_weights(one, folder), _weights(two, folder))
        print(f"{folder}: 1 vs 2 processes, max relative weight difference {diff:.2e}")
        assert diff <= REL_TOL, f"{folder}: {diff:.3e}"
        m1, m2 = _meta(one, folder), _meta(two, folder)
        assert m1["extra"]["train_steps"] == m2["extra"]["train_steps"] == 5  # global steps: ceil(73 / 16)
        t1, t2 = _thresholds(one, folder), _thresholds(two, folder)
        assert (t1 is None) == (t2 is None)
        if t1 is not None:
            assert torch.allclose(torch.tensor(t1), torch.tensor(t2), rtol=THRESHOLD_REL_TOL, atol=0), (folder, t1, t2)
        assert _stable(m1["metrics"]) == _stable(m2["metrics"]), folder
    # the FLOPs schedule's threshold moves and the calibration ran (decided on rank 0) and landed on the same values
    s1, s2 = _meta(one, "01-soft")["extra"], _meta(two, "01-soft")["extra"]
    moves1, moves2 = s1["calibration"]["schedule"]["moves"], s2["calibration"]["schedule"]["moves"]
    assert [m["step"] for m in moves1] == [m["step"] for m in moves2] and any(m["offset"] != 0 for m in moves1)
    assert [m["offset"] for m in moves1] == pytest.approx([m["offset"] for m in moves2], abs=1e-6)
    assert s1["calibration"]["offset"] == pytest.approx(s2["calibration"]["offset"], abs=1e-6)
    assert len(_meta(two, "02-hard")["extra"]["retargets"]) == len(_meta(one, "02-hard")["extra"]["retargets"]) == 1
    # only rank 0 wrote: one run folder, no leftovers
    assert sorted(p.name for p in (two / "stages").iterdir()) == list(FOLDERS)


def test_negative_control_without_gradient_sync_fails_the_comparison(runs):
    for folder in ("00-ft", "01-soft"):
        diff = max_rel_diff(_weights(runs["one"], folder), _weights(runs["nosync"], folder))
        print(f"{folder}: 1 process vs 2 without gradient all-reduce: {diff:.2e}")
        assert diff > 100 * REL_TOL, f"{folder}: {diff:.3e}: the comparison cannot tell synced from unsynced training"
    t1, t2 = _thresholds(runs["one"], "01-soft"), _thresholds(runs["nosync"], "01-soft")
    assert not torch.allclose(torch.tensor(t1), torch.tensor(t2), rtol=THRESHOLD_REL_TOL, atol=0)


def test_ranks_see_disjoint_examples_covering_each_set_once(runs):
    data = json.loads((runs["two"] / "data.json").read_text())["splits"]
    sizes = {s: data[s]["examples"] for s in ("train", "validation", "dev")}
    assert sizes["train"] == 73
    for stage in ("ft", "soft", "hard", "kd"):  # recorded by the first launch (topk was interrupted)
        r0, r1 = (json.loads((runs["record"] / f"{stage}-rank{r}.json").read_text()) for r in (0, 1))
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["train"].keys() == r1["train"].keys() == {"0"}
        a, b = r0["train"]["0"], r1["train"]["0"]
        assert len(a) == len(set(a)) and len(b) == len(set(b)) and not set(a) & set(b), stage
        assert sorted(a + b) == list(range(sizes["train"])), stage
        assert abs(len(a) - len(b)) <= 1, stage  # 5/4 split of the last batch
        assert len(r0["eval"]) == len(r1["eval"]) >= 3  # validation after the epoch, then validation + dev
        for e0, e1 in zip(r0["eval"], r1["eval"]):
            assert e0["split"] == e1["split"]
            i0, i1 = set(e0["indices"]), set(e1["indices"])
            assert not i0 & i1 and len(e0["indices"]) + len(e1["indices"]) == sizes[e0["split"]], (stage, e0["split"])
            assert i0 | i1 == set(range(sizes[e0["split"]]))
            assert e0["metrics"] == e1["metrics"]  # gathered: every rank has the same numbers
        assert any(e0["indices"] and e1["indices"] for e0, e1 in zip(r0["eval"], r1["eval"]))


def test_failing_rank_fails_fast_and_rerun_resumes(runs):
    """Rank 1 raised after step 3 of `topk`: it reported its rank and exited at once with
    `fail_rank`'s exit code, torchrun saw a rank fail (rank 1, or rank 0 on the closed socket) and
    stopped the other, and no rank
    failed on a collective timeout (what a rank left blocked shows); the rerun resumed from the
    step-2 checkpoint (its weights matching the one-process run is checked in
    test_two_processes_match_one). No wall-clock bound: a loaded machine may be slow."""
    proc = runs["crashed"]
    tail = proc.stderr[-6000:]
    assert proc.returncode != 0
    assert "rank 1 of 2 failed in stage 'topk'" in proc.stderr and "injected failure after step 3" in proc.stderr, tail
    assert "ltp-compress: rank 1 exits" in proc.stderr, tail
    root = proc.stderr.split("Root Cause (first observed failure):", 1)
    assert len(root) == 2, f"torchrun reported no failed rank\n{tail}"
    # torchrun names whichever rank it saw exit first: usually rank 1 (exit code 1, fail_rank's), but
    # rank 0 can get there first when its collective sees rank 1's socket close ("Connection reset by
    # peer") — a fast failure too; what must never happen is a rank left waiting for a timeout
    assert re.search(r"rank\s*: [01] \(local_rank: [01]\)\s+exitcode\s*: 1 ", root[1]), tail
    assert not re.search(r"timed out|DistBackendError|rank 0 of 2 failed in stage 'topk': .*timeout", proc.stderr, re.I), tail
    assert runs["checkpoint_step"] == 2
    log = (runs["two"] / "logs" / "run.log").read_text()
    assert "topk: an interrupted attempt left a checkpoint" in log and "topk: resuming from the checkpoint at step 2 of 5" in log
    assert "stage ft (finetune): already finished, skipped" in log


def test_global_batch_split_and_weights(monkeypatch):
    """`local_part` over N ranks: contiguous, disjoint rows covering the batch; example weights
    N·n_r/n and token weights N·t_r/t average to 1 (DDP divides by N); an empty share is one
    placeholder row with weight 0."""
    from ltp_compress.tasks.data import Batch

    for n_rows, world in ((16, 2), (9, 2), (1, 2), (7, 4)):
        lengths = torch.arange(n_rows, 0, -1) % 5 + 2
        width = int(lengths.max())
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batch = Batch(torch.randint(5, 50, (n_rows, width)) * mask, mask, torch.zeros_like(mask), torch.zeros(n_rows, dtype=torch.long),
                      torch.arange(100, 100 + n_rows))
        monkeypatch.setattr(dist, "world_size", lambda: world)
        parts = []
        for r in range(world):
            monkeypatch.setattr(dist, "rank", lambda r=r: r)
            parts.append(dist.local_part(batch))
        seen = [i for p in parts for i in dist.real_indices(p)]
        assert seen == list(range(100, 100 + n_rows))
        assert sum(p.example_weight for p in parts) / world == pytest.approx(1.0)
        assert sum(p.token_weight for p in parts) / world == pytest.approx(1.0)
        for p in parts:
            if p.example_weight == 0:
                assert len(p.batch) == 1 and p.token_weight == 0
            else:  # padding trimmed to the share's longest row
                assert p.batch.attention_mask[:, -1].any()
        if n_rows % world == 0:
            assert all(p.example_weight == 1.0 for p in parts)


def test_batch_size_must_divide_over_processes(monkeypatch):
    from ltp_compress.errors import UserError

    monkeypatch.setattr(dist, "world_size", lambda: 4)
    dist.check_batch_size(32, "stage 'ft': batch_size")
    with pytest.raises(UserError, match=r"stage 'ft': batch_size = 30 is not divisible by the 4 processes"):
        dist.check_batch_size(30, "stage 'ft': batch_size")
