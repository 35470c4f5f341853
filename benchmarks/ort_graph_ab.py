"""A/B of two versions of our ONNX graph builder on one checkpoint (not a test).

Builds the graph of a deployable INT8 checkpoint with `modeling/onnx_export/` as it is now (B)
and as it was at git revision `--baseline-rev` (A) -- or, with `--baseline-float-attention`, A is
the same builder on the same checkpoint with its INT8 attention matmuls taken out (float32 Q·Kᵀ
and P·V, same weights and thresholds; kept tokens may then differ a little: the scores come from
the quantised Q·Kᵀ in B) -- runs both with ONNX Runtime (the runtime's
session options, `--threads`) on the same pre-tokenised, length-bucketed dev batches, interleaved
A, B, A, B... for `--rounds` rounds, and reports examples/s (median over rounds of the median of
`--repeats` passes), the B/A ratio per batch size, and whether both graphs give the same logits
and kept tokens (and whether the two graphs are byte-identical). Writes <out-dir>/<name>.json and .md.

The baseline revision's builder runs in a child process on that revision's own files (`git archive`
into a temporary folder): the child imports `ltp_compress.*` from that folder only, mapped onto its
folders as that revision's pyproject.toml `package-dir` maps them (so a single-file
modeling/onnx_export.py and the modeling/onnx_export/ package both work), and writes the graph's
bytes to a file the parent reads.

    python benchmarks/ort_graph_ab.py runs/demo/stages/04-int8/model --data data/sst2_demo --task sst2 \
        --baseline-rev 058619a --threads 2 --rounds 5
    python benchmarks/ort_graph_ab.py runs/mrpc_minilm/stages/06-int8_attn/model --data ../shared/data/glue/MRPC \
        --task mrpc --baseline-float-attention --name ort_int8_attention_ab
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (REPO, add_timing_args, checkpoint_bench_parser, checkpoint_parts, dev_feeds,  # noqa: E402
                      environment_block, environment_summary, loadavg, timed_rounds)


# The child process that builds the baseline graph, run with its working directory at the revision's files
# (argv[1]: the job file). It imports ltp_compress.* from there only: each name from the folder that the
# longest prefix in that revision's pyproject package-dir maps it to, as setuptools installs it.
_CHILD = r"""
import importlib.abc, importlib.util, json, sys, tomllib
from pathlib import Path

sys.dont_write_bytecode = True
tree, job = Path.cwd(), json.loads(Path(sys.argv[1]).read_text())
setup = tomllib.loads((tree / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
package_dir = setup.get("package-dir") or {"ltp_compress": "ltp_compress"}


class TreeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] != "ltp_compress":
            return None
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in package_dir:
                where = tree.joinpath(package_dir[".".join(parts[:i])], *parts[i:])
                break
        else:
            return None
        if (where / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(fullname, where / "__init__.py", submodule_search_locations=[str(where)])
        if where.with_suffix(".py").is_file():
            return importlib.util.spec_from_file_location(fullname, where.with_suffix(".py"))
        return None


# no other finder (the working tree's editable install) answers for ltp_compress
sys.meta_path[:] = [TreeFinder()] + [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
from safetensors.numpy import load_file

from ltp_compress.modeling.onnx_export import build_onnx_model

model, _ = build_onnx_model(load_file(job["weights"]), job["config"], job["ltp"])
Path(job["out"]).write_bytes(model.SerializeToString())
print(json.dumps({"builder": sys.modules[build_onnx_model.__module__].__file__}))
"""


def baseline_model(rev: str, weights: Path, config: dict, ltp, work: Path):
    """(the onnx.ModelProto that `build_onnx_model` at git revision `rev` builds from these inputs, the file that
    built it relative to that revision's root): the revision's files by `git archive` in a temporary folder, the
    graph built in a child process on them (`_CHILD`), its serialized bytes read back. An older builder reads
    ltp.json as its parsed JSON: the child gets the file's content."""
    import onnx

    tree = Path(tempfile.mkdtemp(prefix="ort_graph_ab_rev_"))
    try:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            tf.extractall(tree, filter="data")
        job, out = work / "A.job.json", work / "A.baseline.onnx"
        job.write_text(json.dumps({"weights": str(Path(weights).resolve()), "config": config,
                                   "ltp": ltp.model_dump(mode="json", exclude_unset=True), "out": str(out)}))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        r = subprocess.run([sys.executable, "-c", _CHILD, str(job)], cwd=tree, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"--baseline-rev {rev}: building its graph failed (child process on `git archive {rev}`):\n"
                             f"{r.stderr[-4000:]}")
        builder = Path(json.loads(r.stdout.strip().splitlines()[-1])["builder"]).resolve()
        if tree.resolve() not in builder.parents:  # the child must have imported the revision's files, not ours
            raise SystemExit(f"--baseline-rev {rev}: the child imported {builder}, not the revision's files in {tree}")
        return onnx.load_model_from_string(out.read_bytes()), builder.relative_to(tree.resolve()).as_posix()
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def main(argv=None) -> int:
    p = checkpoint_bench_parser(__doc__.split("\n\n")[0], "ort_graph_ab")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--baseline-rev", help="git revision of the graph builder to compare against")
    base.add_argument("--baseline-float-attention", action="store_true",
                      help="A: this checkpoint with float32 attention matmuls (it must have INT8 ones)")
    add_timing_args(p, streams=1)
    args = p.parse_args(argv)
    load0 = loadavg()

    import onnxruntime as ort
    import torch

    from ltp_compress.modeling.checkpoint_format import WEIGHTS_FILE
    from ltp_compress.modeling.onnx_export import OUTPUT_NAMES
    from ltp_compress.modeling.onnx_runtime import concurrent_pass, session_options

    torch.set_num_threads(args.threads)
    manifest, tensors, config, ltp = checkpoint_parts(args.checkpoint)
    bss = [int(b) for b in args.batch_sizes.split(",")]
    batches, n_examples = dev_feeds(args.checkpoint, args.data, args.task, bss)
    work = Path(tempfile.mkdtemp())
    sessions, passes = {}, {}  # passes: label -> run_pass(batches), the concurrent throughput setting (--streams > 1)
    variants = {"A": (args.baseline_rev, tensors, ltp), "B": (None, tensors, ltp)}
    if args.baseline_float_attention:
        if ltp.quantization.attention_matmuls != "int8":
            raise SystemExit(f"{args.checkpoint}: --baseline-float-attention needs a checkpoint quantised with attention_matmuls: int8")
        float_ltp = ltp.model_copy(update={"quantization": ltp.quantization.model_copy(update={"attention_matmuls": "fp32"})})
        variants["A"] = (None, {k: v for k, v in tensors.items() if ".int8_matmuls." not in k}, float_ltp)
    import onnx

    from ltp_compress.modeling.onnx_export import build_onnx_model

    graph_sha256, baseline_builder = {}, None
    for label, (rev, tens, ltp_v) in variants.items():
        if rev is None:  # this working tree's builder, in this process
            model, _ = build_onnx_model(tens, config, ltp_v)
        else:
            model, baseline_builder = baseline_model(rev, args.checkpoint / WEIGHTS_FILE, config, ltp_v, work)
        graph_sha256[label] = hashlib.sha256(model.SerializeToString()).hexdigest()
        onnx.save_model(model, str(work / f"{label}.onnx"))
        sessions[label] = ort.InferenceSession(str(work / f"{label}.onnx"), session_options(args.threads),
                                               providers=["CPUExecutionProvider"])
        if args.streams > 1:
            tp = ort.InferenceSession(str(work / f"{label}.onnx"), session_options(max(1, args.threads // args.streams)),
                                      providers=["CPUExecutionProvider"])
            passes[label] = concurrent_pass(lambda f, tp=tp: tp.run(list(OUTPUT_NAMES), f), args.streams)
    # the same outputs?
    same = {}
    for bs in bss:
        outs = {k: [s.run(list(OUTPUT_NAMES), f) for f in batches[bs]] for k, s in sessions.items()}
        same[str(bs)] = {"max_abs_logit_diff": float(max(np.abs(a[0] - b[0]).max() for a, b in zip(outs["A"], outs["B"]))),
                         "kept_tokens_equal": bool(all(np.array_equal(a[1], b[1]) for a, b in zip(outs["A"], outs["B"]))),
                         "mean_kept_tokens_per_layer": {k: np.concatenate([o[1] for o in v]).mean(0).round(3).tolist()
                                                        for k, v in outs.items()}}
    n = {bs: sum(f["input_ids"].shape[0] for f in batches[bs]) for bs in bss}
    times = timed_rounds({k: (lambda f, s=s: s.run(list(OUTPUT_NAMES), f), passes.get(k)) for k, s in sessions.items()},
                         {k: batches for k in sessions}, n, bss, args.rounds, args.repeats)
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "checkpoint": str(args.checkpoint),
           "weights_sha256": manifest["files"][WEIGHTS_FILE]["sha256"], "task": args.task, "examples": n_examples,
           "baseline_rev": args.baseline_rev, "baseline": "float attention" if args.baseline_float_attention else args.baseline_rev,
           "head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                                                    capture_output=True, text=True).stdout.strip(),
           "threads": args.threads, "streams": args.streams, "rounds": args.rounds, "repeats": args.repeats, "onnxruntime": ort.__version__,
           "baseline_builder": baseline_builder, "graph_sha256": graph_sha256,
           "graphs_identical": graph_sha256["A"] == graph_sha256["B"], "same_outputs": same,
           "examples_per_s": {k: {str(bs): statistics.median(v) for bs, v in d.items()} for k, d in times.items()},
           "rounds_examples_per_s": {k: {str(bs): v for bs, v in d.items()} for k, d in times.items()}}
    res["ratio_B_over_A"] = {str(bs): res["examples_per_s"]["B"][str(bs)] / res["examples_per_s"]["A"][str(bs)] for bs in bss}
    # the rounds are interleaved: each round's B / A, the run-to-run noise made visible
    res["rounds_ratio_B_over_A"] = {str(bs): [b / a for a, b in zip(times["A"][bs], times["B"][bs])] for bs in bss}
    res["environment"] = environment_block(args.threads, load0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from ltp_compress.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(args.out_dir / f"{args.name}.json", res)
    title = ("float32 attention (A) vs INT8 attention (B), both built by `" + res["head"] + "` + working tree"
             if args.baseline_float_attention else f"`{args.baseline_rev}` (A) vs `{res['head']}` + working tree (B)")
    L = [f"# ONNX graph A/B: {title}", "",
         f"command: `{res['command']}`", "",
         f"checkpoint `{args.checkpoint}` (weights sha256 `{res['weights_sha256'][:16]}…`), {args.task} dev ({res['examples']} examples), "
         f"onnxruntime {ort.__version__}, {args.threads} threads, {args.rounds} interleaved rounds x {args.repeats} passes"
         + (f"; batch sizes > 1 as {args.streams} concurrent requests on {max(1, args.threads // args.streams)}-thread sessions "
            "(the end-to-end benchmark's throughput setting)" if args.streams > 1 else ""), "",
         environment_summary(res["environment"]), "",
         f"graphs A and B byte-identical: {res['graphs_identical']} (sha256 A `{graph_sha256['A'][:16]}…`, "
         f"B `{graph_sha256['B'][:16]}…`)" + (f"; A built by `{baseline_builder}` at `{args.baseline_rev}`" if baseline_builder else ""), "",
         "| batch size | A ex/s | B ex/s | B / A | per-round B / A (median, min-max) | same kept tokens | max logit diff |",
         "|---|---|---|---|---|---|---|"]
    for bs in bss:
        k = str(bs)
        rr = res["rounds_ratio_B_over_A"][k]
        L.append(f"| {bs} | {res['examples_per_s']['A'][k]:.1f} | {res['examples_per_s']['B'][k]:.1f} | {res['ratio_B_over_A'][k]:.3f}x | "
                 f"{statistics.median(rr):.3f}x ({min(rr):.3f}-{max(rr):.3f}) | "
                 f"{same[k]['kept_tokens_equal']} | {same[k]['max_abs_logit_diff']:.2e} |")
    L += ["", "mean tokens entering each layer (bs " + str(bss[-1]) + "): " +
          "; ".join(f"{k}: {v}" for k, v in same[str(bss[-1])]["mean_kept_tokens_per_layer"].items())]
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
