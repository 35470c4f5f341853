"""Fused runtime: how a batch is walked (FusedEncoder.set_schedule) against throughput, pruned and dense.

The extension runs a batch in spans of consecutive sequences of at most `span_tokens` tokens, each
span through every layer, and each layer of a span on groups of at most `group_tokens` of the tokens
entering it (re-formed at every layer). Every schedule gives bit-equal numbers
(tests/test_fused_runtime.py); this measures which is fastest. The question it answers: do the deep
layers' GEMMs (a few surviving rows per sequence) gain from running one GEMM over the surviving rows
of many more sequences (spans of the whole batch, groups re-formed as pruning shrinks them)?

Both checkpoints run their dev set in the end-to-end benchmark's batches, batch sizes > 1 as the bench
runs the fused runtime there (`streams` concurrent calls of threads // streams threads), every
(checkpoint, schedule) pair interleaved inside each round. Reports examples/s (median of rounds) and
the pruned / dense ratio per schedule.

    python benchmarks/fused_schedule.py runs/mrpc_template/stages/04-int8/model \\
        --dense /tmp/bench_mrpc_work2/dense_int8_ckpt --data ../shared/data/glue/MRPC --task mrpc
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import add_timing_args, checkpoint_bench_parser, dev_feeds, environment_block, environment_summary, loadavg, timed_rounds  # noqa: E402

DEFAULT_SCHEDULES = "256:256,1000000:256,1000000:512,1000000:1000000,128:128"


def main(argv=None) -> dict:
    p = checkpoint_bench_parser(__doc__.splitlines()[0], "fused_schedule")
    p.add_argument("--dense", type=Path, required=True, help="the dense INT8 deployable checkpoint (the bench's dense_int8_ckpt)")
    p.add_argument("--schedules", default=DEFAULT_SCHEDULES, help="span_tokens:group_tokens,... (the first is the default's row)")
    add_timing_args(p, streams=2)
    args = p.parse_args(argv)
    import torch

    from ltp_compress.modeling.fused_runtime import load_fused

    load0 = loadavg()
    bss = [int(x) for x in args.batch_sizes.split(",")]
    scheds = [tuple(int(v) for v in s.split(":")) for s in args.schedules.split(",")]
    models, items, n = {}, {}, {}
    for label, ck in (("pruned", args.checkpoint), ("dense", args.dense)):
        feeds, n_ex = dev_feeds(ck, args.data, args.task, bss)
        one = load_fused(ck, threads=args.threads)
        many = load_fused(ck, threads=args.threads, streams=args.streams) if args.streams > 1 else one
        models[label] = (one, many)
        items[label] = {bs: [{k: torch.from_numpy(v) for k, v in f.items()} for f in feeds[bs]] for bs in bss}
        n = {bs: n_ex for bs in bss}
        default = one.encoder.schedule

    def runner(label, sched):
        one, many = models[label]

        def set_():
            one.encoder.set_schedule(*sched)
            many.encoder.set_schedule(*sched)

        def run_one(b):
            set_()
            return one.logits(b)

        def run_pass(bl):
            set_()
            return many.logits_many(bl)
        return run_one, (run_pass if args.streams > 1 else None)

    systems = {f"{label} {s[0]}:{s[1]}": runner(label, s) for s in scheds for label in models}
    sys_items = {k: items[k.split()[0]] for k in systems}
    with torch.inference_mode():
        times = timed_rounds(systems, sys_items, n, bss, args.rounds, args.repeats)
    rows = []
    for s in scheds:
        key = f"{s[0]}:{s[1]}"
        row = {"span_tokens": s[0], "group_tokens": s[1], "default": s == tuple(default), "by_batch_size": {}}
        for bs in bss:
            pr, de = (statistics.median(times[f"{lab} {key}"][bs]) for lab in ("pruned", "dense"))
            row["by_batch_size"][str(bs)] = {"pruned_examples_per_s": pr, "dense_examples_per_s": de, "pruned_over_dense": pr / de,
                                             "pruned_rounds": times[f"pruned {key}"][bs], "dense_rounds": times[f"dense {key}"][bs]}
        rows.append(row)
    env = environment_block(args.threads, load0)
    out = {"command": "python benchmarks/fused_schedule.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "checkpoint": str(args.checkpoint), "dense": str(args.dense), "task": args.task, "examples": n[bss[0]],
           "threads": args.threads, "streams": args.streams, "rounds": args.rounds, "repeats": args.repeats,
           "default_schedule": list(default), "rows": rows, "environment": env}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = args.out_dir / f".{args.name}.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(args.out_dir / f"{args.name}.json")
    lines = [f"# Fused runtime: batch schedule vs throughput ({args.task}, {out['examples']} dev examples)", "",
             f"command: `{out['command']}`", "", f"environment: {environment_summary(env)}", "",
             "span_tokens: a span of consecutive sequences of at most this many tokens goes through every layer before the "
             "next; group_tokens: each layer of a span runs on groups of at most this many of the tokens entering it, "
             "re-formed at every layer (1000000: the whole batch). Every schedule gives bit-equal logits and kept tokens. "
             f"examples/s, median of {args.rounds} interleaved rounds (each the median of {args.repeats} passes); bs > 1: "
             f"{args.streams} concurrent calls of {max(1, args.threads // args.streams)} thread(s), as the end-to-end bench "
             "runs the fused runtime.", "",
             "| span_tokens | group_tokens | " + " | ".join(f"bs {b} pruned | bs {b} dense | bs {b} pruned / dense" for b in bss) + " |",
             "|---|---|" + "---|" * (3 * len(bss))]
    for r in rows:
        cells = []
        for b in bss:
            x = r["by_batch_size"][str(b)]
            cells += [f"{x['pruned_examples_per_s']:.0f}", f"{x['dense_examples_per_s']:.0f}", f"{x['pruned_over_dense']:.2f}x"]
        lines.append(f"| {r['span_tokens']}{' (default)' if r['default'] else ''} | {r['group_tokens']} | " + " | ".join(cells) + " |")
    tmp = args.out_dir / f".{args.name}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out_dir / f"{args.name}.md")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
