"""Where our exported graph spends its time in ONNX Runtime (not a test).

Exports a deployable INT8 checkpoint with `modeling/onnx_export/` as it is now, runs the task's
dev set through it once per batch size (length-bucketed batches, the runtime's session options,
`--threads`) with ONNX Runtime's profiler on, and sums the kernel time per op type and per op class
(integer GEMMs, attention, token scoring / selection, quantisation, LayerNorm / GELU / residual
adds, the rest). The `If` that picks the batch-of-one branch is a container: its time is the
sum of the nodes inside it, so it is left out of the totals. Profiling adds a per-node cost, so
the fractions, not the absolute times, are the result. Writes <out-dir>/<name>.json and .md.

    python benchmarks/ort_profile.py runs/sst2_minilm/stages/04-int8/model --data ../shared/data/glue/SST-2 \
        --task sst2 --threads 2 --name ort_profile_sst2
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

from ltp_compress.modeling.export_format import INTEGER_GEMM_OPS

# op type -> class (names are the ONNX op types ORT's profile reports after its graph optimisations)
OP_CLASSES = {
    "integer GEMM": INTEGER_GEMM_OPS,
    "activation quantisation": ("QuantizeLinear", "Max", "DynamicQuantizeLinear"),
    "attention": ("Attention", "Softmax", "Split", "Transpose", "Expand", "FusedMatMul"),
    "token scoring / selection": ("ReduceSum", "Div", "Greater", "NonZero", "Compress", "ScatterElements", "TopK",
                                  "And", "Or", "CumSum", "Less", "Range", "Where", "Equal", "Not"),
    "LayerNorm / GELU / residual": ("LayerNormalization", "Gelu", "Add", "SkipLayerNormalization", "BiasGelu"),
}
CONTAINERS = ("If",)


def op_class(op: str, node_name: str) -> str:
    if op == "MatMul":  # float MatMul: the scores' column sums, or attention in the spelled-out form
        return "token scoring / selection" if "column_sum" in node_name else "attention"
    if op == "Gather" and ("prune." in node_name or "to_grid" in node_name):
        return "token scoring / selection" if "prune." in node_name else "attention"
    for cls, ops in OP_CLASSES.items():
        if op in ops:
            return cls
    return "other (shapes, gathers, casts, head)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, required=True, help="GLUE task folder with dev.tsv")
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="ort_profile")
    args = p.parse_args(argv)
    # the same dev batches as the graph A/B (this folder is on sys.path)
    from _harness import dev_feeds, environment_block, environment_summary, loadavg

    from ltp_compress.fileio import atomic_write_json, atomic_write_text

    load0 = loadavg()

    import onnxruntime as ort

    from ltp_compress.manifest import sha256_file
    from ltp_compress.modeling.export_format import read_export_info
    from ltp_compress.modeling.onnx_export import ONNX_FILE, export_onnx
    from ltp_compress.modeling.onnx_runtime import session_options

    work = Path(tempfile.mkdtemp())
    export = export_onnx(args.checkpoint, work / "onnx")
    info = read_export_info(export)
    result = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "checkpoint": str(args.checkpoint), "weights_sha256": sha256_file(args.checkpoint / "model.safetensors"),
              "task": args.task, "threads": args.threads, "onnxruntime": ort.__version__,
              "attention_op": info.attention_op, "batch_sizes": {}}
    feeds, _ = dev_feeds(args.checkpoint, args.data, args.task, [int(x) for x in args.batch_sizes.split(",")])
    for bs, batches in feeds.items():
        so = session_options(args.threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(work / f"profile_bs{bs}")
        sess = ort.InferenceSession(str(export / ONNX_FILE), so, providers=["CPUExecutionProvider"])
        for f in batches:
            sess.run(None, f)
        events = json.loads(Path(sess.end_profiling()).read_text())
        by_op, by_class, nodes = collections.Counter(), collections.Counter(), collections.Counter()
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            op = e["args"]["op_name"]
            if op in CONTAINERS:
                continue
            by_op[op] += e["dur"]
            nodes[op] += 1
            by_class[op_class(op, e["name"])] += e["dur"]
        total = sum(by_op.values())
        result["batch_sizes"][str(bs)] = {
            "batches": len(batches), "kernel_us": total,
            "classes": {k: {"us": v, "fraction": v / total} for k, v in by_class.most_common()},
            "ops": {k: {"us": v, "fraction": v / total, "kernel_calls": nodes[k]} for k, v in by_op.most_common()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result["environment"] = environment_block(args.threads, load0)
    atomic_write_json(args.out_dir / f"{args.name}.json", result)
    lines = [f"# ONNX Runtime profile of our exported graph ({args.task})", "", environment_summary(result["environment"]), "",
             f"command: `{result['command']}`", "",
             f"checkpoint `{args.checkpoint}` (weights sha256 `{result['weights_sha256'][:16]}…`), attention op "
             f"`{result['attention_op']}`, onnxruntime {ort.__version__}, {args.threads} threads, the dev set once per batch size; "
             "kernel time summed per op class and op type (the batch-of-one `If` container left out; profiling adds a "
             "per-node cost, so read the fractions)", ""]
    for bs, r in result["batch_sizes"].items():
        lines += [f"## batch size {bs}", "", "| op class | fraction |", "|---|---|"]
        lines += [f"| {k} | {v['fraction'] * 100:.1f} % |" for k, v in r["classes"].items()]
        lines += ["", "| op type | kernel calls | fraction |", "|---|---|---|"]
        lines += [f"| {k} | {v['kernel_calls']} | {v['fraction'] * 100:.1f} % |" for k, v in list(r["ops"].items())[:15]]
        lines.append("")
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
