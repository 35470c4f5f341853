"""What the integer GEMMs alone cost in our exported graph, at the rows each one really runs (not a test).

The speed goals of the deployed runtime (2x the best dense INT8 peer, 10x HF FP32, pruning realising
>= 0.9 of its FLOPs reduction) are bounded by the integer GEMMs: whatever else a faster graph or a
fused kernel removes, these stay. This measures that bound with ONNX Runtime's own kernels:

1. the checkpoint is exported as it is now (`build_onnx_model`), and its two `If` branches (batch of
   one; general batch) are split into standalone graphs (`onnx_runtime.branch_models`, as the runtime runs them);
2. every dev batch runs through the branch its batch size takes, with the float input of every
   QuantizeLinear that feeds an integer GEMM exposed as an output: the real activations, at the rows
   the pruned graph really quantises ([rows, K]);
3. a GEMM-only graph (those QuantizeLinear + MatMulIntegerToFloat nodes, with the checkpoint's
   weights, scales and biases, nothing else) runs on exactly those inputs: **integer GEMMs alone,
   pruned**; and on inputs with every encoder GEMM at the unpruned rows (layer 0's Q/K/V rows, which
   no token has left yet; pooler and classifier at one row per example): **integer GEMMs alone,
   dense**;
4. the whole graph runs the same batches, as `load_onnx` runs it (its two branches as two sessions). All three are timed in
   interleaved rounds with the end-to-end benchmark's protocol: batch size 1 one request at a time on
   `--threads` threads, larger batches as `--streams` concurrent requests on threads // streams-thread
   sessions.

With `--e2e` (an end-to-end result JSON on the same checkpoint and machine) the table also gives the
throughput each goal needs (2x that file's best dense INT8 peer, 10x its HF FP32 sdpa), so a goal
that needs more than the GEMMs alone deliver is beyond what these kernels can do on this machine,
whatever the rest of the graph costs. "GEMM realised" = (dense GEMM time / pruned GEMM time) /
(dense GEMM MACs / pruned GEMM MACs): how much of the MAC reduction the GEMMs themselves turn into time
(small-M GEMMs are bound by reading the weights, so their time does not fall with the rows).
Writes <out-dir>/<name>.json and .md.

    python benchmarks/gemm_floor.py runs/sst2_minilm/stages/12-int8_full_range/model \\
        --data ../shared/data/glue/SST-2 --task sst2 --threads 2 --streams 2 \\
        --e2e benchmarks/results/e2e_bench_sst2.json --name gemm_floor_sst2
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from ltp_compress.modeling.export_format import INT8_OPS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))



def gemm_parts(branch: bytes):
    """(instrumented model bytes, GEMM-only model bytes, [(quantize input name, quantize node name, [(K, N)
    of each GEMM reading it])])
    of a standalone branch model: the instrumented model also outputs the float input of every
    QuantizeLinear that feeds an integer GEMM; the GEMM-only model is those QuantizeLinear and GEMM
    nodes with their initializers, the float inputs as graph inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load_from_string(branch)
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    gemms = [n for n in g.node if n.op_type in INT8_OPS]
    quant = []  # QuantizeLinear nodes feeding a GEMM, in graph order, each once
    for n in gemms:
        q = producer.get(n.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            raise SystemExit(f"GEMM {n.name}: its input is not produced by a QuantizeLinear")
        if q not in quant:
            quant.append(q)
    qin = [q.input[0] for q in quant]
    inst = onnx.ModelProto()
    inst.CopyFrom(m)
    inst.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in qin)
    nodes = quant + gemms
    used = {i for n in nodes for i in n.input if i}
    const_nodes = [n for n in g.node if n.op_type == "Constant" and n.output[0] in used]
    only = helper.make_graph(const_nodes + nodes, "integer_gemms_only",
                             [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in qin],
                             [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in gemms],
                             initializer=[inits[i] for i in sorted(used) if i in inits])
    only_model = helper.make_model(only, opset_imports=m.opset_import, ir_version=m.ir_version)
    shapes = []  # per quantize input: the (K, N) of each GEMM that reads it
    for q in quant:
        kn = [tuple(numpy_helper.to_array(inits[n.input[1]]).shape) for n in gemms if n.input[0] == q.output[0]]
        shapes.append((q.input[0], q.name, kn))
    return inst.SerializeToString(), only_model.SerializeToString(), shapes


def main(argv=None) -> int:
    from _harness import (add_timing_args, checkpoint_bench_parser, checkpoint_parts, dev_feeds, environment_block,
                          environment_summary, loadavg, timed_rounds)

    from ltp_compress.pipeline.environment import EnvironmentMismatch, check_same_isa

    p = checkpoint_bench_parser(__doc__.split("\n\n")[0], "gemm_floor")
    add_timing_args(p, streams=2)
    p.add_argument("--e2e", type=Path, help="end-to-end result JSON (benchmarks/results/e2e_bench_*.json) for the goals' throughputs")
    args = p.parse_args(argv)
    load0 = loadavg()
    e2e = json.loads(args.e2e.read_text()) if args.e2e else None
    if e2e is not None:  # its throughputs share this run's table: the same ISA, checked before measuring
        try:
            check_same_isa({str(args.e2e): e2e.get("environment"), "this run": environment_block(args.threads, load0)}, speed=True)
        except EnvironmentMismatch as e:
            raise SystemExit(f"--e2e: {e}")

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
    branches = branch_models(model)
    if branches is None:
        raise SystemExit(f"{args.checkpoint}: its export has no batch-of-one `If` (top-k pruning); gemm_floor needs it")
    parts = dict(zip(("one", "many"), (gemm_parts(b) for b in branches)))

    def sess(b: bytes, threads: int):
        return ort.InferenceSession(b, session_options(threads), providers=["CPUExecutionProvider"])

    # real activations at the pruned rows, and the same GEMMs at the unpruned rows
    gemm_feeds: dict[str, dict[int, list[dict]]] = {"pruned": {}, "dense": {}}
    macs = {"pruned": {}, "dense": {}}
    inst = {k: sess(v[0], args.threads) for k, v in parts.items()}
    for bs in bss:
        gemm_feeds["pruned"][bs], gemm_feeds["dense"][bs] = [], []
        macs["pruned"][bs] = macs["dense"][bs] = 0
        for f in batches[bs]:
            b = f["input_ids"].shape[0]
            key = "one" if b == 1 else "many"
            names = [x for x, _, _ in parts[key][2]]
            encoder = {x for x, qname, _ in parts[key][2] if "encoder.layer." in qname}
            outs = inst[key].run(names, f)
            pruned = dict(zip(names, outs))
            dense_rows = outs[0].shape[0]  # layer 0's Q/K/V input: every real token of the batch
            dense = {x: (a if x not in encoder else np.resize(a, (dense_rows, a.shape[1])).astype(np.float32))
                     for x, a in pruned.items()}
            for x, _, kn in parts[key][2]:
                for K, N in kn:
                    macs["pruned"][bs] += pruned[x].shape[0] * K * N
                    macs["dense"][bs] += dense[x].shape[0] * K * N
            gemm_feeds["pruned"][bs].append((key, pruned))
            gemm_feeds["dense"][bs].append((key, dense))

    def runner(threads: int):
        """system -> run(item) on `threads`-thread sessions"""
        s_graph = {"one": sess(branches[0], threads), "many": sess(branches[1], threads)}  # as load_onnx runs the export
        s_gemm = {k: sess(v[1], threads) for k, v in parts.items()}
        return {"graph": lambda f: s_graph["one" if f["input_ids"].shape[0] == 1 else "many"].run(list(OUTPUT_NAMES), f),
                "gemms_pruned": lambda item: s_gemm[item[0]].run(None, item[1]),
                "gemms_dense": lambda item: s_gemm[item[0]].run(None, item[1])}

    systems = ("graph", "gemms_pruned", "gemms_dense")
    items = {"graph": batches, "gemms_pruned": gemm_feeds["pruned"], "gemms_dense": gemm_feeds["dense"]}
    latency = runner(args.threads)
    tp = runner(max(1, args.threads // args.streams))
    throughput = {k: concurrent_pass(fn, args.streams) for k, fn in tp.items()}
    n = {bs: sum(f["input_ids"].shape[0] for f in batches[bs]) for bs in bss}
    times = timed_rounds({s: (latency[s], throughput[s]) for s in systems}, items, n, bss, args.rounds, args.repeats)
    eps = {s: {str(bs): statistics.median(v) for bs, v in d.items()} for s, d in times.items()}

    goals = {}
    if e2e is not None:
        for bs in bss:
            k = str(bs)
            hf = next((r["examples_per_s"] for r in e2e["results"].get("hf_fp32_sdpa", {}).get("runs", []) if r["batch_size"] == bs), None)
            peer = (e2e.get("best_int8_peer") or {}).get(k)
            goals[k] = {"best_int8_peer": peer,
                        "needed_for_2x_best_int8_peer": 2 * peer["examples_per_s"] if peer else None,
                        "hf_fp32_sdpa": hf, "needed_for_10x_hf_fp32_sdpa": 10 * hf if hf else None}
    table = {}
    for bs in bss:
        k = str(bs)
        g, gp, gd = eps["graph"][k], eps["gemms_pruned"][k], eps["gemms_dense"][k]
        mac_red = macs["dense"][bs] / macs["pruned"][bs]
        table[k] = {"graph_examples_per_s": g, "gemms_pruned_examples_per_s": gp, "gemms_dense_examples_per_s": gd,
                    "gemm_share_of_graph_time": g / gp, "gemm_mac_reduction": mac_red,
                    "gemm_time_reduction": gp / gd, "gemm_realised_fraction": (gp / gd) / mac_red,
                    "gemm_macs_per_example_pruned": macs["pruned"][bs] / n[bs],
                    "gemm_gops_pruned": 2 * macs["pruned"][bs] / n[bs] * gp / 1e9, **goals.get(k, {})}
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "checkpoint": str(args.checkpoint),
           "weights_sha256": manifest["files"][WEIGHTS_FILE]["sha256"], "task": args.task, "examples": n_examples,
           "head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "threads": args.threads, "streams": args.streams, "rounds": args.rounds, "repeats": args.repeats,
           "onnxruntime": ort.__version__, "e2e": str(args.e2e) if args.e2e else None,
           "examples_per_s": eps, "rounds_examples_per_s": {s: {str(bs): v for bs, v in d.items()} for s, d in times.items()},
           "by_batch_size": table}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res["environment"] = environment_block(args.threads, load0)
    atomic_write_json(args.out_dir / f"{args.name}.json", res)
    L = [f"# Integer GEMMs alone vs our whole exported graph, as our runtime runs it ({args.task})", "", environment_summary(res["environment"]), "",
         f"command: `{res['command']}`", "",
         f"checkpoint `{args.checkpoint}` (weights sha256 `{res['weights_sha256'][:16]}…`), {args.task} dev ({n_examples} examples), "
         f"onnxruntime {ort.__version__}, graph built by `{res['head']}` + working tree, {args.threads} threads; batch size 1 one request "
         f"at a time, larger batches as {args.streams} concurrent requests on {max(1, args.threads // args.streams)}-thread sessions; "
         f"{args.rounds} interleaved rounds x {args.repeats} passes. The GEMM-only graph holds the export's QuantizeLinear + "
         "MatMulIntegerToFloat nodes (checkpoint weights and scales) and runs on the activations the pruned graph really "
         "quantised (pruned) or on every encoder GEMM at the unpruned rows (dense).", "",
         "| batch size | whole graph ex/s | integer GEMMs alone, pruned, ex/s | GEMM share of the graph's time | GEMM GOP/s | "
         "integer GEMMs alone, dense, ex/s | GEMM MAC reduction | GEMM time reduction | GEMM realised |"
         + (" needed for 2x best INT8 peer | needed for 10x HF FP32 sdpa |" if goals else ""),
         "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if goals else "")]
    for bs in bss:
        t = table[str(bs)]
        row = (f"| {bs} | {t['graph_examples_per_s']:.0f} | {t['gemms_pruned_examples_per_s']:.0f} | {t['gemm_share_of_graph_time']:.2f} | "
               f"{t['gemm_gops_pruned']:.0f} | {t['gemms_dense_examples_per_s']:.0f} | {t['gemm_mac_reduction']:.2f}x | "
               f"{t['gemm_time_reduction']:.2f}x | {t['gemm_realised_fraction']:.2f} |")
        if goals:
            a, b = t.get("needed_for_2x_best_int8_peer"), t.get("needed_for_10x_hf_fp32_sdpa")
            row += f" {a:.0f} |" if a else " – |"
            row += f" {b:.0f} |" if b else " – |"
        L.append(row)
    if goals:
        L += ["", f"goal throughputs from `{args.e2e}` (best dense INT8 peer per batch size: "
              + ", ".join(f"bs {k}: {v['best_int8_peer']['system']} {v['best_int8_peer']['examples_per_s']:.0f} ex/s"
                          for k, v in goals.items() if v.get("best_int8_peer")) + "; the whole graph's ex/s here is this run's, "
              "not that file's)"]
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
