"""Wall-clock speed of token pruning (FP32) and the cost of threshold vs top-k token selection.

Part 1 — pruned vs unpruned, same runtime (our packed forward; the unpruned model is the same
weights with pruning off), same length-bucketed dev batches, FP32, N threads, bs 1 and 32.
Reports the speedup, the FLOPs reduction measured by the token-aware accountant on the same
inputs, and their ratio (1.0 = wall-clock tracks FLOPs exactly). HF eager (dense) is timed too.

Part 2 — selection cost: `score > θ` (LTP) vs per-row top-k (sort-based) on random scores
[bs, seq] at seq 128 and 512, bs 32, plus the same inside one layer's keep-and-gather step.

    python benchmarks/ltp_speed.py --model runs/sst2_minilm/stages/02-hard/model \
        --data ../shared/data/glue/SST-2 --task sst2 --threads 2

Writes benchmarks/results/ltp_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_speed(model_dir: Path, data_dir: Path, task_name: str, threads: int, max_examples: int, bs1_examples: int,
                rounds_n: int = 7) -> dict:
    from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_packed
    from ltp_compress.modeling.accounting import EncoderShape, relative_flops
    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, tokenize_split
    from ltp_compress.modeling.model_io import load_stage_model
    from ltp_compress.tasks.glue import get_task

    torch.set_num_threads(threads)
    task = get_task(task_name)
    model, tok, pruning = load_stage_model(model_dir, task)
    model.eval()
    cfg = DataConfig(source="glue_dir", path=str(data_dir), max_dev_examples=max_examples)
    ts = tokenize_split(load_split(cfg, task, "dev"), tok, 128, num_labels=task.num_labels)
    pad = tok.pad_token_id or 0
    dense = PruningConfig()
    shape = EncoderShape.from_config(model.config)
    out = {"model": str(model_dir), "pruning": pruning.to_dict(), "threads": threads, "examples": len(ts), "runs": []}
    out["speedup_method"] = f"median over {rounds_n} interleaved rounds of unpruned/pruned time ratios"
    for bs in (1, 32):
        batches = length_bucketed_batches(ts, bs, shuffle=False, seed=0, pad_token_id=pad)
        if bs == 1:
            batches = batches[:: max(1, len(batches) // bs1_examples)][:bs1_examples]
        n_ex = sum(b.input_ids.shape[0] for b in batches)
        kept = []
        lengths = []

        def run(p, collect=False):
            with torch.inference_mode():
                for b in batches:
                    o = forward_packed(model, b.input_ids, b.attention_mask, b.token_type_ids, p, return_kept=collect)
                    if collect:
                        kept.append(o.kept_tokens.numpy())
                        lengths.append(b.attention_mask.sum(1).numpy())

        def run_hf():
            with torch.inference_mode():
                for b in batches:
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.token_type_ids)

        run(pruning, collect=True)
        kept_a, len_a = np.concatenate(kept), np.concatenate(lengths)
        rel_flops = relative_flops(kept_a, len_a, shape)
        # interleaved rounds (dense, pruned, HF) so slow phases of a shared machine hit all three;
        # speedup = median of the per-round ratios, times = medians
        # the weight-streaming floor: the same forwards on a 1-token input ([CLS] only), so every
        # GEMM is a GEMV that still reads all weights. No token pruning can go below it.
        cls_only = [(b.input_ids[:, :1], b.attention_mask[:, :1], None if b.token_type_ids is None else b.token_type_ids[:, :1])
                    for b in batches]

        def run_floor():
            with torch.inference_mode():
                for i, m_, t in cls_only:
                    forward_packed(model, i, m_, t, dense)

        for fn in (lambda: run(dense), lambda: run(pruning), run_hf, run_floor):
            fn()  # warmup
        rounds = [(_time(lambda: run(dense), 1, 0), _time(lambda: run(pruning), 1, 0), _time(run_hf, 1, 0), _time(run_floor, 1, 0))
                  for _ in range(rounds_n)]
        t_dense, t_pruned, t_hf, t_floor = (statistics.median(r[i] for r in rounds) for i in range(4))
        speedup = statistics.median(r[0] / r[1] for r in rounds)
        # what the FLOPs reduction allows once the floor is respected: t_dense / max(t_floor, t_dense/red.)
        attainable = min(1 / rel_flops, t_dense / t_floor)
        # where the time goes: one profiled pass each; GEMM = self time of aten::addmm/mm/bmm
        gemm = {name: _gemm_seconds(lambda p=p: run(p)) for name, p in (("dense", dense), ("pruned", pruning))}
        out["runs"].append({
            "batch_size": bs, "examples": n_ex, "mean_tokens": float(len_a.mean()), "rounds": rounds_n,
            "speedup_per_round": [r[0] / r[1] for r in rounds],
            "dense_s": t_dense, "pruned_s": t_pruned, "hf_eager_dense_s": t_hf,
            "dense_ex_per_s": n_ex / t_dense, "pruned_ex_per_s": n_ex / t_pruned, "hf_ex_per_s": n_ex / t_hf,
            "speedup": speedup, "relative_flops": rel_flops, "flops_reduction": 1 / rel_flops,
            "speedup_over_flops_reduction": speedup * rel_flops,
            "one_token_floor_s": t_floor, "one_token_floor_ex_per_s": n_ex / t_floor,
            "attainable_speedup": attainable, "speedup_over_attainable": speedup / attainable,
            "profiled": gemm, "gemm_speedup": gemm["dense"]["gemm_s"] / gemm["pruned"]["gemm_s"],
        })
    return out


def _gemm_seconds(fn) -> dict:
    """One pass under torch.profiler: seconds in GEMM kernels (self CPU of aten::addmm, aten::mm,
    aten::bmm) and in everything else (profiler overhead inflates the small ops somewhat)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    g = sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm", "aten::bmm")) / 1e6
    return {"gemm_s": g, "other_s": total - g}


def selection_cost(threads: int, repeats: int = 200) -> list[dict]:
    from ltp_compress.modeling.pruned_encoder import _topk_keep

    torch.set_num_threads(threads)
    rows = []
    g = torch.Generator().manual_seed(0)
    for seq in (128, 512):
        bs, d = 32, 768
        score = torch.rand(bs, seq, generator=g) * 2
        present = torch.ones(bs, seq, dtype=torch.bool)
        n0 = torch.full((bs,), seq)
        x = torch.randn(bs * seq, d, generator=g)

        def thr():
            keep = score > 1.0
            keep[:, 0] = True
            return keep

        def topk():
            return _topk_keep(score, present, n0, 0.5)

        def thr_gather():
            return x[thr().reshape(-1)]

        def topk_gather():
            return x[topk().reshape(-1)]

        t_thr = _time(lambda: [thr() for _ in range(repeats)]) / repeats
        t_topk = _time(lambda: [topk() for _ in range(repeats)]) / repeats
        t_thr_g = _time(lambda: [thr_gather() for _ in range(repeats // 4)]) / (repeats // 4)
        t_topk_g = _time(lambda: [topk_gather() for _ in range(repeats // 4)]) / (repeats // 4)
        rows.append({"seq": seq, "batch_size": bs, "threshold_us": 1e6 * t_thr, "topk_us": 1e6 * t_topk,
                     "topk_over_threshold": t_topk / t_thr, "threshold_plus_gather_us": 1e6 * t_thr_g,
                     "topk_plus_gather_us": 1e6 * t_topk_g, "with_gather_ratio": t_topk_g / t_thr_g})
    return rows


def render(result: dict) -> str:
    from ltp_compress.pipeline.environment import environment_summary

    lines = ["# Token pruning speed (FP32)", "", environment_summary(result.get("environment")), ""]
    for m in result["models"]:
        lines += [f"model `{m['model']}`, {m['threads']} threads, {m['examples']} dev examples; pruning `{m['pruning']['mode']}`; "
                  f"speedup = {m['speedup_method']}", "",
                  "| bs | examples | mean tokens | unpruned ex/s (ours) | pruned ex/s | HF eager ex/s | speedup | FLOPs reduction | speedup / FLOPs reduction | pruned vs HF eager |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["runs"]:
            lines.append(f"| {r['batch_size']} | {r['examples']} | {r['mean_tokens']:.1f} | {r['dense_ex_per_s']:.1f} | {r['pruned_ex_per_s']:.1f} | "
                         f"{r['hf_ex_per_s']:.1f} | {r['speedup']:.2f}x | {r['flops_reduction']:.2f}x | {r['speedup_over_flops_reduction']:.2f} | "
                         f"{r['pruned_ex_per_s'] / r['hf_ex_per_s']:.2f}x |")
        lines += ["", "Weight-streaming floor: the same forwards on a 1-token input ([CLS] only: every GEMM reads all "
                  "weights for one row). Attainable speedup = t_unpruned / max(t_floor, t_unpruned / FLOPs reduction).", "",
                  "| bs | 1-token floor ex/s | attainable speedup | speedup / attainable |", "|---|---|---|---|"]
        for r in m["runs"]:
            lines.append(f"| {r['batch_size']} | {r['one_token_floor_ex_per_s']:.1f} | {r['attainable_speedup']:.2f}x | {r['speedup_over_attainable']:.2f} |")
        lines += ["", "Where the time goes (one profiled pass each; GEMM = aten::addmm/mm/bmm self time; "
                  "the profiler inflates the many small non-GEMM ops):", "",
                  "| bs | unpruned GEMM s | unpruned other s | pruned GEMM s | pruned other s | GEMM-time speedup | FLOPs reduction |",
                  "|---|---|---|---|---|---|---|"]
        for r in m["runs"]:
            d_, p_ = r["profiled"]["dense"], r["profiled"]["pruned"]
            lines.append(f"| {r['batch_size']} | {d_['gemm_s']:.3f} | {d_['other_s']:.3f} | {p_['gemm_s']:.3f} | {p_['other_s']:.3f} | "
                         f"{r['gemm_speedup']:.2f}x | {r['flops_reduction']:.2f}x |")
        lines.append("")
    lines += ["# Selection cost: threshold vs top-k (bs 32, random scores)", "",
              "| seq | threshold µs | top-k µs | top-k / threshold | threshold+gather µs | top-k+gather µs | ratio with gather |", "|---|---|---|---|---|---|---|"]
    for r in result["selection"]:
        lines.append(f"| {r['seq']} | {r['threshold_us']:.1f} | {r['topk_us']:.1f} | {r['topk_over_threshold']:.1f}x | "
                     f"{r['threshold_plus_gather_us']:.1f} | {r['topk_plus_gather_us']:.1f} | {r['with_gather_ratio']:.2f}x |")
    lines += ["", f"command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, action="append", required=True, help="pruned stage model folder (repeatable)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--bs1-examples", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per batch size")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="ltp_speed")
    a = p.parse_args()
    from ltp_compress.fileio import atomic_write_text
    from ltp_compress.pipeline.environment import environment_block, loadavg

    load0 = loadavg()
    result = {"command": "python " + " ".join(sys.argv),
              "models": [model_speed(m, a.data, a.task, a.threads, a.max_examples, a.bs1_examples, a.rounds) for m in a.model],
              "selection": selection_cost(a.threads)}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    result["environment"] = environment_block(a.threads, load0)
    atomic_write_text(a.out_dir / f"{a.name}.json", json.dumps(result, indent=2))
    atomic_write_text(a.out_dir / f"{a.name}.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
