"""What the checkpoint benchmarks in this folder share (not a test, not part of the package): the
command line of a benchmark of one checkpoint on a task's dev set, interleaved timing rounds, the
checkpoint read for `build_onnx_model`, the dev set as ONNX feeds, and the environment block + its
Markdown line every result file carries (pipeline/environment.py). The scripts import it as
`_harness` (a script's folder is on sys.path); it may import the package, the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ltp_compress.pipeline.environment import environment_block, environment_summary, loadavg  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]


def checkpoint_bench_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The arguments every benchmark of one checkpoint on a task's dev set shares (checkpoint, --data,
    --task, --threads, --out-dir, --name); each script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("checkpoint", type=Path, help="deployable INT8 checkpoint folder")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=name)
    return p


def add_timing_args(p: argparse.ArgumentParser, streams: int) -> None:
    """--streams (default `streams`), --batch-sizes, --repeats, --rounds: the options of `timed_rounds`."""
    p.add_argument("--streams", type=int, default=streams,
                   help="batch sizes > 1 run as this many concurrent requests on a session with threads // streams "
                        "intra-op threads (the throughput setting of load_onnx(streams=...) and the end-to-end benchmark)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)


def timed_rounds(systems: dict, items: dict, n: dict[int, int], bss: list[int], rounds: int, repeats: int) -> dict:
    """Interleaved timing: `rounds` times, every system at every batch size, `repeats` passes over
    items[system][bs] each, the median pass kept. systems: name -> (run_one(item), run_pass(items) or None);
    a batch size > 1 runs through run_pass where there is one (the concurrent throughput setting; one warm-up
    pass first starts its pool's threads), batch size 1 and systems without one item by item.
    Returns {name: {bs: [examples/s per round]}} (n[bs]: examples in a pass)."""
    times = {k: {bs: [] for bs in bss} for k in systems}
    for _ in range(rounds):
        for k, (run_one, run_pass) in systems.items():
            for bs in bss:
                concurrent = bs > 1 and run_pass is not None
                if concurrent:
                    run_pass(items[k][bs])
                per = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    if concurrent:
                        run_pass(items[k][bs])
                    else:
                        for it in items[k][bs]:
                            run_one(it)
                    per.append(time.perf_counter() - t0)
                times[k][bs].append(n[bs] / statistics.median(per))
    return times


def checkpoint_parts(checkpoint: Path) -> tuple[dict, dict, dict, dict]:
    """A deployable checkpoint verified against its manifest, then read: (manifest, tensors {name: numpy},
    HF config, ltp.json as its typed CheckpointInfo), the inputs of `build_onnx_model`."""
    from safetensors.numpy import load_file

    from ltp_compress.modeling.checkpoint_format import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint_info, verify_checkpoint

    manifest = verify_checkpoint(checkpoint)
    return (manifest, load_file(str(checkpoint / WEIGHTS_FILE)), json.loads((checkpoint / CONFIG_FILE).read_text()),
            read_checkpoint_info(checkpoint, verify=False))


def dev_feeds(checkpoint: Path, data: Path, task_name: str, batch_sizes: list[int],
              with_labels: bool = False) -> tuple[dict[int, list[dict]], int] | tuple[dict[int, list[dict]], int, dict[int, list]]:
    """The task's dev set tokenised by the checkpoint's tokenizer as ONNX feeds ({input name: int64
    [b, s]}), in length-bucketed batches per batch size (as the end-to-end benchmark batches every
    system); also the number of examples, and with `with_labels` the labels of each batch
    ({batch size: [int64 [b]]})."""
    import torch

    from ltp_compress.modeling.checkpoint_format import read_checkpoint_info
    from ltp_compress.modeling.model_io import load_tokenizer
    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, tokenize_split
    from ltp_compress.tasks.glue import get_task

    ltp = read_checkpoint_info(checkpoint)
    tok = load_tokenizer(checkpoint)
    dev = load_split(DataConfig(source="glue_dir", path=str(data)), get_task(task_name), "dev")
    ts = tokenize_split(dev, tok, ltp.max_seq_length)
    batches = {bs: list(length_bucketed_batches(ts, bs, shuffle=False, seed=0, pad_token_id=tok.pad_token_id)) for bs in batch_sizes}
    feeds = {bs: [{"input_ids": b.input_ids.numpy(), "attention_mask": b.attention_mask.numpy(),
                   "token_type_ids": (b.token_type_ids if b.token_type_ids is not None else torch.zeros_like(b.input_ids)).numpy()}
                  for b in bl]
             for bs, bl in batches.items()}
    if with_labels:
        return feeds, len(ts.labels), {bs: [b.labels.numpy() for b in bl] for bs, bl in batches.items()}
    return feeds, len(ts.labels)
