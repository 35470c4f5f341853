"""Our exported ONNX graph on OpenVINO vs on ONNX Runtime (not a test): is OpenVINO a runtime we
should offer for the deployable model?

Builds the graph of a deployable INT8 checkpoint with `modeling/onnx_export/` in three forms --
as `ltp-compress export` writes it (a batch-of-one `If` branch, MatMulIntegerToFloat, the fused
Attention op), the batch graph alone (`batch_of_one_branch=False`: no `If`, so OpenVINO compiles
one graph), and the batch graph with only standard ONNX ops (MatMulInteger, spelled-out attention)
-- and runs the exported form on ONNX Runtime (our session options: `load_onnx`'s; and, as the
counterpart of OpenVINO's throughput mode above batch size 1, `onnxruntime_concurrent`: one session
with one intra-op thread called by `threads` Python threads at once, which ONNX Runtime's
`InferenceSession.run` allows) and every form on
OpenVINO, configured as its docs recommend (`INFERENCE_NUM_THREADS` = threads, `PERFORMANCE_HINT`
LATENCY for batch size 1, THROUGHPUT with an `AsyncInferQueue` of OPTIMAL_NUMBER_OF_INFER_REQUESTS
jobs for larger batches, as the OpenVINO peers of the end-to-end benchmark run) with
`INFERENCE_PRECISION_HINT=f32`: the graph's float ops (scores, thresholds) as the export specifies
them (the CPU's default would be bf16). Same pre-tokenised, length-bucketed dev batches for all,
interleaved rounds; reports examples/s, dev accuracy, and agreement with ONNX Runtime (argmax,
kept tokens per example and layer, max |logit diff|), and OpenVINO's executed layer precisions
(where the `If` hides the body, only the batch-only forms show their u8/i8 layers).

    python benchmarks/openvino_graph.py runs/sst2_minilm/stages/04-int8/model --data ../shared/data/glue/SST-2 \
        --task sst2 --threads 2 --rounds 2 --name openvino_graph_sst2
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (REPO, checkpoint_bench_parser, checkpoint_parts, dev_feeds, environment_block,  # noqa: E402
                      environment_summary, loadavg)

#: graph forms: build_onnx_model keyword arguments
FORMS = {
    "exported": {},
    "batch_graph": {"batch_of_one_branch": False},
    "batch_graph_standard_ops": {"batch_of_one_branch": False, "int8_op": "MatMulInteger", "attention_op": "MatMul"},
}
#: (runtime, form) pairs measured
SYSTEMS = (("onnxruntime", "exported"), ("onnxruntime_concurrent", "exported"), ("openvino", "exported"),
           ("openvino", "batch_graph"), ("openvino", "batch_graph_standard_ops"))
OPENVINO_DOCS = ["https://docs.openvino.ai/2025/openvino-workflow/running-inference/optimize-inference/high-level-performance-hints.html",
                 "https://docs.openvino.ai/2025/openvino-workflow/running-inference/optimize-inference/optimizing-throughput.html",
                 "https://docs.openvino.ai/2025/openvino-workflow/running-inference/optimize-inference/precision-control.html"]


def openvino_runner(path: Path, threads: int, batch_size: int):
    """(run_pass(feeds) -> list of (logits, kept), settings) for one OpenVINO compiled model."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    hint = "LATENCY" if batch_size == 1 else "THROUGHPUT"
    cfg = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": hint}
    cm = core.compile_model(model, "CPU", cfg)
    if batch_size == 1:
        req = cm.create_infer_request()

        def run_pass(feeds):
            out = []
            for f in feeds:
                r = req.infer(f)
                out.append((r[cm.outputs[0]].copy(), r[cm.outputs[1]].copy()))
            return out
        jobs = 1
    else:
        jobs = int(cm.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue = ov.AsyncInferQueue(cm, jobs)

        def run_pass(feeds):
            out = [None] * len(feeds)

            def done(r, i):
                out[i] = (r.get_output_tensor(0).data.copy(), r.get_output_tensor(1).data.copy())
            queue.set_callback(done)
            for i, f in enumerate(feeds):
                queue.start_async(f, i)
            queue.wait_all()
            return out
    from ltp_compress.pipeline.peers.openvino_peers import runtime_precisions

    return run_pass, {"requested": cfg, "infer_requests": jobs, "runtime_layers": runtime_precisions(cm)}


def ort_concurrent_runner(path: Path, threads: int):
    """run_pass for one ONNX Runtime session with one intra-op thread, called from `threads` threads at once
    (the end-to-end benchmark's throughput pass for every ONNX Runtime system)."""
    from ltp_compress.modeling.onnx_export import OUTPUT_NAMES
    from ltp_compress.modeling.onnx_runtime import concurrent_pass
    from ltp_compress.pipeline.peers.onnxruntime_peers import THROUGHPUT_PASS, open_session

    sess = open_session(path, 1)
    return concurrent_pass(lambda f: tuple(sess.run(list(OUTPUT_NAMES), f)), threads), {"pass": THROUGHPUT_PASS, "threads": threads}


def main(argv=None) -> int:
    p = checkpoint_bench_parser(__doc__.split("\n\n")[0], "openvino_graph")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    load0 = loadavg()

    import onnx
    import onnxruntime as ort
    import openvino as ov

    from ltp_compress.fileio import atomic_write_json, atomic_write_text
    from ltp_compress.modeling.checkpoint_format import WEIGHTS_FILE
    from ltp_compress.modeling.onnx_export import OUTPUT_NAMES, build_onnx_model
    from ltp_compress.modeling.onnx_runtime import session_options

    manifest, tensors, config, ltp = checkpoint_parts(args.checkpoint)
    bss = [int(b) for b in args.batch_sizes.split(",")]
    feeds, n_examples, labels = dev_feeds(args.checkpoint, args.data, args.task, bss, with_labels=True)
    work = Path(tempfile.mkdtemp())
    paths = {}
    for form, kw in FORMS.items():
        model, _ = build_onnx_model(tensors, config, ltp, **kw)
        paths[form] = work / f"{form}.onnx"
        onnx.save_model(model, str(paths[form]))
    latency_sessions = {form: ort.InferenceSession(str(paths[form]), session_options(args.threads), providers=["CPUExecutionProvider"])
                        for rt, form in SYSTEMS if rt.startswith("onnxruntime")}  # one request at a time, all threads
    runners, settings = {}, {}
    for rt, form in SYSTEMS:
        key = f"{rt}:{form}"
        settings[key] = {}
        for bs in bss:
            if rt == "onnxruntime_concurrent" and bs > 1:
                runners[(key, bs)], settings[key][str(bs)] = ort_concurrent_runner(paths[form], args.threads)
            elif rt.startswith("onnxruntime"):
                runners[(key, bs)] = (lambda s: lambda fs: [tuple(s.run(list(OUTPUT_NAMES), f)) for f in fs])(latency_sessions[form])
                settings[key][str(bs)] = {"session_options": "modeling.onnx_runtime.session_options", "threads": args.threads}
            else:
                runners[(key, bs)], settings[key][str(bs)] = openvino_runner(paths[form], args.threads, bs)
    keys = [f"{rt}:{form}" for rt, form in SYSTEMS]
    ref = keys[0]
    quality = {}
    for bs in bss:
        outs = {k: runners[(k, bs)](feeds[bs]) for k in keys}
        y = np.concatenate(labels[bs])
        for k in keys:
            logits = np.concatenate([o[0] for o in outs[k]])
            kept = [o[1] for o in outs[k]]
            r_logits = np.concatenate([o[0] for o in outs[ref]])
            quality.setdefault(k, {})[str(bs)] = {
                "dev_accuracy": float((logits.argmax(-1) == y).mean()),
                "argmax_agreement_vs_ort": float((logits.argmax(-1) == r_logits.argmax(-1)).mean()),
                "kept_tokens_agreement_vs_ort": float(np.mean(np.concatenate(
                    [(a == b).all(-1) for a, b in zip(kept, (o[1] for o in outs[ref]))]))),
                "max_abs_logit_diff_vs_ort": float(np.abs(logits - r_logits).max())}
    n = {bs: sum(f["input_ids"].shape[0] for f in feeds[bs]) for bs in bss}
    times = {k: {bs: [] for bs in bss} for k in keys}
    for _ in range(args.rounds):
        for k in keys:
            for bs in bss:
                run = runners[(k, bs)]
                run(feeds[bs][:2])  # warm the shapes of this pass's first batches
                per = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    run(feeds[bs])
                    per.append(time.perf_counter() - t0)
                times[k][bs].append(n[bs] / statistics.median(per))
    eps = {k: {str(bs): statistics.median(v) for bs, v in d.items()} for k, d in times.items()}
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "checkpoint": str(args.checkpoint),
           "weights_sha256": manifest["files"][WEIGHTS_FILE]["sha256"], "task": args.task, "examples": n_examples,
           "head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
           "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats, "onnxruntime": ort.__version__,
           "openvino": ov.__version__, "forms": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in FORMS.items()},
           "settings": settings, "openvino_docs": OPENVINO_DOCS, "quality": quality, "examples_per_s": eps,
           "rounds_examples_per_s": {k: {str(bs): v for bs, v in d.items()} for k, d in times.items()},
           "ratio_vs_ort": {k: {str(bs): eps[k][str(bs)] / eps[ref][str(bs)] for bs in bss} for k in keys}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res["environment"] = environment_block(args.threads, load0)
    atomic_write_json(args.out_dir / f"{args.name}.json", res)
    L = [f"# Our exported graph on OpenVINO vs ONNX Runtime ({args.task})", "", environment_summary(res["environment"]), "",
         f"command: `{res['command']}`", "",
         f"checkpoint `{args.checkpoint}` (weights sha256 `{res['weights_sha256'][:16]}…`), graph built by `{res['head']}` + working tree, "
         f"{args.task} dev ({n_examples} examples, length-bucketed, pre-tokenised), onnxruntime {ort.__version__}, openvino {ov.__version__}, "
         f"{args.threads} threads, {args.rounds} interleaved rounds x {args.repeats} passes; OpenVINO: LATENCY hint at bs 1, THROUGHPUT + "
         "AsyncInferQueue above, INFERENCE_PRECISION_HINT f32", "",
         "| system | " + " | ".join(f"bs{bs} ex/s (vs ORT)" for bs in bss) + " | dev acc. | argmax agree vs ORT | kept tokens agree vs ORT | max logit diff |",
         "|---|" + "---|" * (len(bss) + 4)]
    for k in keys:
        q = quality[k][str(bss[-1])]
        L.append(f"| {k} | " + " | ".join(f"{eps[k][str(bs)]:.0f} ({res['ratio_vs_ort'][k][str(bs)]:.2f}x)" for bs in bss)
                 + f" | {100 * q['dev_accuracy']:.2f} | {q['argmax_agreement_vs_ort']:.4f} | {q['kept_tokens_agreement_vs_ort']:.4f} | "
                 f"{q['max_abs_logit_diff_vs_ort']:.3f} |")
    L += ["", f"agreement columns at bs {bss[-1]} (every batch size in the JSON).", "",
          "OpenVINO executed layers (runtime model, layer type / precision), bs " + str(bss[-1]) + ":", ""]
    for k in (k for k in keys if k.startswith("openvino")):
        layers = settings[k][str(bss[-1])]["runtime_layers"]
        ints = {kk: v for kk, v in layers.items() if kk.split("/")[-1] in ("u8", "i8")}
        L.append(f"- {k}: integer-precision layers {ints or 'none visible'}")
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
