"""recipes/qqp_int8.yaml (roberta-base, QQP from the hub) cannot run here: validate it, and run its
exact stage chain on a tiny local stand-in (tiny RoBERTa + QQP-format TSV files), through the same
data and model loading code."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from conftest import REPO, build_tiny_model
from ltp_compress.pipeline.recipe import load_recipe
from ltp_compress.pipeline.runner import preflight, run_recipe

QQP = REPO / "recipes" / "qqp_int8.yaml"


def test_qqp_recipe_validates():
    r = load_recipe(QQP)
    assert r.model == "roberta-base" and r.task == "qqp" and r.data.source == "hub"
    assert [s.stage for s in r.stages] == ["finetune", "ltp_soft", "ltp_hard", "distill", "quantize"]
    student = r.stages[3]
    assert student.kd_teacher == "teacher" and student.quant_aware
    _, problems = preflight(r, QQP)
    assert problems == []  # hub source and hub id: nothing local to check


def _write_qqp_tsv(folder: Path, n: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    words = "how do i learn python what is the best way to cook rice why is the sky blue where can buy a car".split()
    lines = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    for i in range(n):
        q1 = " ".join(rng.choices(words, k=rng.randint(4, 12))) + "?"
        dup = rng.random() < 0.4
        q2 = q1 if dup else " ".join(rng.choices(words, k=rng.randint(4, 12))) + "?"
        lines.append(f"{i}\t{2 * i}\t{2 * i + 1}\t{q1}\t{q2}\t{int(dup)}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    (folder / "dev.tsv").write_text("\n".join(lines[: n // 2]) + "\n")


def test_qqp_chain_on_tiny_standin(tmp_path):
    model = build_tiny_model(tmp_path / "tiny_roberta", "roberta", num_labels=2)
    _write_qqp_tsv(tmp_path / "QQP", 96, seed=0)
    raw = yaml.safe_load(QQP.read_text())
    for st in raw["stages"]:  # tiny budgets; CPU has no bf16 autocast need
        st.pop("mixed_precision", None)
        if "epochs" in st:
            st["epochs"] = 1
        st["batch_size" if st["stage"] != "quantize" else "calibration_batches"] = 16 if st["stage"] != "quantize" else 2
        if st["stage"] != "quantize":
            st["lr"] = 1e-3
    raw["stages"][1].pop("target_flops")  # keep the tiny run short
    raw.update(model=str(model), output_dir=str(tmp_path / "runs"),
               data={"source": "glue_dir", "path": str(tmp_path / "QQP"), "max_seq_length": 64})
    recipe = tmp_path / "qqp_tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run_dir = run_recipe(recipe, progress=False)
    report = json.loads((run_dir / "report.json").read_text())
    assert [s["id"] for s in report["stages"]] == ["teacher", "soft", "hard", "student", "int8"]
    int8 = report["stages"][-1]
    assert set(int8["metrics"]["dev"]) >= {"f1", "accuracy", "f1_acc", "main"}  # QQP metric: mean of F1 and acc
    assert abs(int8["metrics"]["dev"]["f1_acc"] - (int8["metrics"]["dev"]["f1"] + int8["metrics"]["dev"]["accuracy"]) / 2) < 1e-9
    hard = report["stages"][2]
    # INT8 linears cut BOPs below the FP32 hard-pruned model's (attention matmuls stay FP32)
    assert int8["cost"]["relative_bops_vs_fp32_dense"] < hard["cost"]["relative_bops_vs_fp32_dense"]
    assert (run_dir / "stages" / "04-int8" / "model" / "manifest.json").is_file()
