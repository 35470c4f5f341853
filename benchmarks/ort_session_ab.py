"""Session-level variants of our ONNX Runtime deployment on one checkpoint (not a test): the same
exported graph, run with the runtime's session options (`modeling/onnx_runtime.py`) and with
documented ONNX Runtime knobs or a different session layout, interleaved, on the task's dev set.

Variants (A is the graph as plain onnxruntime runs it, one session):
* `whole_graph`: `session_options(threads)`, the graph as exported (an `If` on the batch size picks the
  batch-of-one branch or the general one); `load_onnx(..., branch_sessions=False)`;
* `denormal_as_zero`: + `session.set_denormal_as_zero = 1` (flush denormal floats; ORT's
  performance-tuning docs);
* `dynamic_block_base`: + `session.dynamic_block_base = 4` (ORT's thread pool splits a parallel
  loop into shrinking blocks; only matters with more than one intra-op thread, i.e. batch size 1
  here);
* `branch_sessions`: the two branches of the `If` as two sessions (`onnx_runtime.branch_models`: each
  branch's nodes as a graph of its own, the initializers it reads), the batch size choosing the
  session in Python: what the `If` itself costs. This is how `load_onnx` runs an export (its default).

Batch size 1 runs one request at a time on `threads` intra-op threads (the latency setting); larger
batch sizes run as `--streams` concurrent requests on threads // streams-thread sessions (the
throughput setting of `load_onnx(streams=...)` and the end-to-end benchmark). Outputs must match the
whole graph's exactly (logits and kept tokens); the table says whether they do.

    python benchmarks/ort_session_ab.py runs/sst2_minilm/stages/12-int8_full_range/model \\
        --data ../shared/data/glue/SST-2 --task sst2 --threads 2 --streams 2 --name ort_session_ab_sst2
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = ("whole_graph", "denormal_as_zero", "dynamic_block_base", "branch_sessions")
CONFIG_ENTRIES = {"denormal_as_zero": {"session.set_denormal_as_zero": "1"},
                  "dynamic_block_base": {"session.dynamic_block_base": "4"}}


def main(argv=None) -> int:
    from _harness import (add_timing_args, checkpoint_bench_parser, checkpoint_parts, dev_feeds, environment_block,
                          environment_summary, loadavg, timed_rounds)

    p = checkpoint_bench_parser(__doc__.split("\n\n")[0], "ort_session_ab")
    add_timing_args(p, streams=2)
    args = p.parse_args(argv)
    load0 = loadavg()

    import onnxruntime as ort
    import torch

    from ltp_compress.fileio import atomic_write_json, atomic_write_text
    from ltp_compress.modeling.checkpoint_format import WEIGHTS_FILE
    from ltp_compress.modeling.onnx_export import OUTPUT_NAMES, build_onnx_model
    from ltp_compress.modeling.onnx_runtime import branch_models, concurrent_pass, session_options

    torch.set_num_threads(args.threads)
    manifest, tensors, config, ltp = checkpoint_parts(args.checkpoint)
    bss = [int(b) for b in args.batch_sizes.split(",")]
    batches, n_examples = dev_feeds(args.checkpoint, args.data, args.task, bss)
    model, _ = build_onnx_model(tensors, config, ltp)
    whole = model.SerializeToString()
    branches = branch_models(model)
    if branches is None:
        raise SystemExit("branch_sessions needs the graph's batch-of-one `If` (a threshold or unpruned checkpoint)")
    one, many = branches
    outputs = list(OUTPUT_NAMES)

    def options(variant: str, threads: int):
        so = session_options(threads)
        for k, v in CONFIG_ENTRIES.get(variant, {}).items():
            so.add_session_config_entry(k, v)
        return so

    def runner(variant: str, threads: int):
        """feed -> (logits, kept) for this variant on `threads`-thread session(s)."""
        def sess(b):
            return ort.InferenceSession(b, options(variant, threads), providers=["CPUExecutionProvider"])
        if variant == "branch_sessions":
            s1, sn = sess(one), sess(many)
            return lambda f: (s1 if f["input_ids"].shape[0] == 1 else sn).run(outputs, f)
        s = sess(whole)
        return lambda f: s.run(outputs, f)

    latency = {v: runner(v, args.threads) for v in VARIANTS}  # bs 1, one request at a time
    throughput = {v: concurrent_pass(runner(v, max(1, args.threads // args.streams)), args.streams) for v in VARIANTS}
    same = {}
    for bs in bss:
        ref = [latency["whole_graph"](f) for f in batches[bs]]
        same[str(bs)] = {}
        for v in VARIANTS[1:]:
            got = [latency[v](f) for f in batches[bs]]
            same[str(bs)][v] = bool(all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(ref, got)))
    n = {bs: sum(f["input_ids"].shape[0] for f in batches[bs]) for bs in bss}
    times = timed_rounds({v: (latency[v], throughput[v]) for v in VARIANTS}, {v: batches for v in VARIANTS}, n, bss,
                         args.rounds, args.repeats)
    # per round, each variant's ex/s over the whole graph's (the rounds are interleaved), median over rounds
    ratio = {v: {str(bs): statistics.median(x / d for x, d in zip(times[v][bs], times["whole_graph"][bs])) for bs in bss} for v in VARIANTS}
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "checkpoint": str(args.checkpoint),
           "weights_sha256": manifest["files"][WEIGHTS_FILE]["sha256"], "task": args.task, "examples": n_examples,
           "threads": args.threads, "streams": args.streams, "rounds": args.rounds, "repeats": args.repeats,
           "onnxruntime": ort.__version__, "config_entries": CONFIG_ENTRIES, "same_outputs_as_whole_graph": same,
           "examples_per_s": {v: {str(bs): statistics.median(x) for bs, x in d.items()} for v, d in times.items()},
           "rounds_examples_per_s": {v: {str(bs): x for bs, x in d.items()} for v, d in times.items()},
           "ratio_vs_whole_graph": ratio}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res["environment"] = environment_block(args.threads, load0)
    atomic_write_json(args.out_dir / f"{args.name}.json", res)
    L = ["# ONNX Runtime session variants of our deployment", "", environment_summary(res["environment"]), "", f"command: `{res['command']}`", "",
         f"checkpoint `{args.checkpoint}` (weights sha256 `{res['weights_sha256'][:16]}…`), {args.task} dev ({n_examples} examples), "
         f"onnxruntime {ort.__version__}, {args.threads} threads; bs 1 one request at a time, larger batches as {args.streams} "
         f"concurrent requests on {max(1, args.threads // args.streams)}-thread sessions; {args.rounds} interleaved rounds x "
         f"{args.repeats} passes; ratio = median over rounds of the variant's ex/s over the whole graph's in the same round", "",
         "| variant | " + " | ".join(f"bs {bs} ex/s (ratio)" for bs in bss) + " | outputs identical to the whole graph |",
         "|---|" + "---|" * len(bss) + "---|"]
    for v in VARIANTS:
        cells = [f"{res['examples_per_s'][v][str(bs)]:.1f} ({ratio[v][str(bs)]:.3f}x)" for bs in bss]
        ident = "-" if v == "whole_graph" else ", ".join(f"bs {bs}: {same[str(bs)][v]}" for bs in bss)
        L.append(f"| {v} | " + " | ".join(cells) + f" | {ident} |")
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
