"""Is a dev difference between two models more than noise? (not a test)

One seed per setting leaves the question open; a paired test on the same dev examples answers part
of it (the part due to which examples dev happens to hold; seed-to-seed variation of training is
not covered). For each pair of models: per-example predictions on the dev set, the difference of
the task's main metric (B − A), a 95 % paired bootstrap interval of that difference (examples
resampled, 10,000 times, seeded), and for classification the exact McNemar test on the examples
exactly one of the two gets right. Models: deployable INT8 checkpoints (torch runtime) or float
stage folders (their pruning rule from pruning.json), all run with the packed token-removing
forward. Writes <out-dir>/<name>.json and .md.

    python benchmarks/paired_comparison.py --data ../shared/data/glue/MRPC --task mrpc \\
        --pair "manual vs LTP" runs/mrpc_sweep-p0/stages/03-manual/model runs/mrpc_sweep-p0/stages/02-hard/model \\
        --name paired_mrpc
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np


def predictions(model_dir: Path, data: Path, task_name: str, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, dict]:
    """(predictions [n] in dev order, labels [n], what ran) for one model folder."""
    import torch

    from ltp_compress.modeling.checkpoint_format import LTP_FILE
    from ltp_compress.modeling.model_io import load_stage_model
    from ltp_compress.modeling.pruned_encoder import forward_packed
    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, tokenize_split
    from ltp_compress.tasks.glue import get_task

    task = get_task(task_name)
    if (model_dir / LTP_FILE).is_file():
        from ltp_compress.modeling.deploy import load_deployable

        dm = load_deployable(model_dir)
        model, tokenizer, pruning, kind = dm.model, dm.tokenizer, dm.pruning, f"deployable INT8 ({dm.backend})"
        max_len = dm.max_seq_length
    else:
        model, tokenizer, pruning = load_stage_model(model_dir, task)
        kind, max_len = "float stage model", 128
    dev = load_split(DataConfig(source="glue_dir", path=str(data)), task, "dev")
    ts = tokenize_split(dev, tokenizer, max_len)
    out = np.zeros(len(ts.labels), dtype=np.float64 if task.num_labels == 1 else np.int64)
    model.eval()
    with torch.no_grad():
        for b in length_bucketed_batches(ts, batch_size, shuffle=False, seed=0, pad_token_id=tokenizer.pad_token_id):
            logits = forward_packed(model, b.input_ids, b.attention_mask, b.token_type_ids, pruning).logits.float()
            out[b.index.numpy()] = logits.squeeze(-1).numpy() if task.num_labels == 1 else logits.argmax(-1).numpy()
    return out, np.asarray(ts.labels), {"model": str(model_dir), "kind": kind, "pruning": pruning.mode}


def mcnemar_exact(b_only: int, a_only: int) -> float:
    """Two-sided exact McNemar p-value: the discordant examples split Binomial(n, 1/2) under H0."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def compare(task_name: str, pa: np.ndarray, pb: np.ndarray, labels: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    from ltp_compress.tasks.glue import get_task
    from ltp_compress.tasks.metrics import compute_metrics

    task = get_task(task_name)
    main = lambda p, y: compute_metrics(task, p, y)["main"]  # noqa: E731
    diff = main(pb, labels) - main(pa, labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    boot = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        boot[i] = main(pb[idx], labels[idx]) - main(pa[idx], labels[idx])
    res = {"main_a": main(pa, labels), "main_b": main(pb, labels), "diff_b_minus_a": diff,
           "bootstrap_95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
           "bootstrap_share_b_better": float((boot > 0).mean()), "examples": n}
    if task.num_labels > 1:
        ca, cb = pa == labels, pb == labels
        res["b_only_correct"], res["a_only_correct"] = int((cb & ~ca).sum()), int((ca & ~cb).sum())
        res["mcnemar_p"] = mcnemar_exact(res["b_only_correct"], res["a_only_correct"])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="GLUE-format folder with dev.tsv")
    p.add_argument("--task", required=True)
    p.add_argument("--pair", nargs=3, action="append", required=True, metavar=("LABEL", "A", "B"),
                   help="a label and two model folders (repeatable); the difference is B − A")
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="paired_comparison")
    args = p.parse_args(argv)
    from ltp_compress.pipeline.environment import environment_block, environment_summary, loadavg

    load0 = loadavg()

    import torch

    from ltp_compress.fileio import atomic_write_json, atomic_write_text

    torch.set_num_threads(args.threads)
    cache: dict[str, tuple] = {}
    rows = []
    for label, a, b in args.pair:
        for m in (a, b):
            if m not in cache:
                cache[m] = predictions(Path(m), args.data, args.task)
        (pa, labels, ia), (pb, _, ib) = cache[a], cache[b]
        rows.append({"label": label, "a": ia, "b": ib, **compare(args.task, pa, pb, labels, args.resamples)})
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "task": args.task, "data": str(args.data),
           "split": "dev", "resamples": args.resamples, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res["environment"] = environment_block(args.threads, load0)
    atomic_write_json(args.out_dir / f"{args.name}.json", res)
    L = [f"# Paired comparisons on {args.task} dev", "", environment_summary(res["environment"]), "", f"command: `{res['command']}`", "",
         "B − A in main-metric points on the same dev examples; 95 % paired bootstrap interval over examples "
         f"({args.resamples} resamples); exact McNemar p on the examples exactly one model gets right. Covers the "
         "sampling of dev examples only, not training seeds.", "",
         "| comparison | A | B | A main | B main | B − A | 95 % interval | B-only / A-only correct | McNemar p |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["bootstrap_95"]
        mc = f"{r['b_only_correct']} / {r['a_only_correct']} | {r['mcnemar_p']:.3f}" if "mcnemar_p" in r else "- | -"
        L.append(f"| {r['label']} | `{r['a']['model']}` | `{r['b']['model']}` | {100 * r['main_a']:.2f} | {100 * r['main_b']:.2f} | "
                 f"{100 * r['diff_b_minus_a']:+.2f} | [{100 * lo:+.2f}, {100 * hi:+.2f}] | {mc} |")
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
