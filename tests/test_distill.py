"""Knowledge distillation (stages/distill.py): loss terms against hand computation, and the stage
on a tiny pruned student (plain and quant-aware) changes the weights and saves a usable model."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltp_compress.stages.distill import distill_loss, embedding_loss, kd_logit_loss

from conftest import DEMO_DATA, build_tiny_model


def test_kd_logit_loss_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    total = 0.0
    for si, ti in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / T) for v in si)
        zt = sum(math.exp(v / T) for v in ti)
        ps = [math.exp(v / T) / zs for v in si]
        pt = [math.exp(v / T) / zt for v in ti]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = total / 2 * T * T
    assert float(kd_logit_loss(s, t, T)) == pytest.approx(expected, rel=1e-5)
    assert float(kd_logit_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    # regression: plain MSE of the single output
    r_s, r_t = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]])
    assert float(kd_logit_loss(r_s, r_t, T)) == pytest.approx((1 + 9) / 2)


def test_kd_logit_gradient_matches_temperature_scaling():
    # d/ds [T² KL] = T (p_s - p_t): check against autograd
    s = torch.tensor([[0.3, -0.2]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0]])
    T = 3.0
    kd_logit_loss(s, t, T).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_embedding_loss_by_hand_counts_real_tokens_only():
    e_s = torch.zeros(2, 3, 2)
    e_t = torch.zeros(2, 3, 2)
    e_s[0, 0] = torch.tensor([1.0, 3.0])  # real
    e_s[1, 1] = torch.tensor([2.0, 0.0])  # real
    e_s[1, 2] = torch.tensor([100.0, 100.0])  # padding: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = (1 + 9 + 4) / (5 * 2)
    assert float(embedding_loss(e_s, e_t, mask)) == pytest.approx(expected)
    assert float(embedding_loss(e_s[:1], e_t[:1])) == pytest.approx(10 / 6)
    with pytest.raises(ValueError):
        embedding_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_distill_loss_combines_terms():
    class Out:
        def __init__(self, logits, emb):
            self.logits, self.embeddings = logits, emb

    class Cfg:
        kd_alpha, kd_temperature, logit_weight, embedding_weight = 0.3, 2.0, 0.5, 2.0

    g = torch.Generator().manual_seed(0)
    so, to = Out(torch.randn(4, 2, generator=g), torch.randn(4, 5, 8, generator=g)), Out(torch.randn(4, 2, generator=g), torch.randn(4, 5, 8, generator=g))
    labels = torch.tensor([0, 1, 1, 0])
    mask = torch.ones(4, 5, dtype=torch.long)
    loss, parts = distill_loss(so, to, labels, mask, 2, Cfg)
    task = torch.nn.functional.cross_entropy(so.logits, labels)
    exp = 0.3 * task + 0.7 * (0.5 * kd_logit_loss(so.logits, to.logits, 2.0) + 2.0 * embedding_loss(so.embeddings, to.embeddings, mask))
    assert float(loss) == pytest.approx(float(exp), rel=1e-6)
    assert parts["task"] == pytest.approx(float(task))


def test_pruning_stage_loss_adds_logit_kd_from_dense_teacher(tiny_bert):
    """`kd_teacher` on ltp_soft / ltp_hard / baselines: kd_alpha·CE + (1-kd_alpha)·KD, where the
    teacher's logits come from its dense (unpruned) forward."""
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification

    from ltp_compress.modeling.pruned_encoder import ForwardOutput, forward_masked
    from ltp_compress.stages.common import pruning_stage_loss

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 7), generator=g)
    batch = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=None, labels=torch.tensor([0, 1, 1]))
    student_logits = torch.randn(3, 2, generator=g)
    student = ForwardOutput(logits=student_logits)
    cfg = SimpleNamespace(kd_alpha=0.25, kd_temperature=3.0)
    t_logits = forward_masked(teacher, ids, batch.attention_mask, None, mode="dense").logits
    ce = torch.nn.functional.cross_entropy(student_logits, batch.labels)
    expect = 0.25 * ce + 0.75 * kd_logit_loss(student_logits, t_logits, 3.0)
    with_kd = pruning_stage_loss(student, batch, teacher, cfg, 2)
    assert float(with_kd.total.detach()) == pytest.approx(float(expect.detach()), rel=1e-6) and with_kd.rank is None
    assert float(pruning_stage_loss(student, batch, None, cfg, 2).total) == pytest.approx(float(ce), rel=1e-6)
    assert float(kd_logit_loss(t_logits, t_logits, 3.0).detach()) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- the stage


def _context(tmp_path: Path, student: Path, teacher: Path, cfg_yaml: str):
    from ltp_compress.modeling.model_io import load_tokenizer
    from ltp_compress.pipeline.recipe import load_recipe
    from ltp_compress.pipeline.runner import load_task_data
    from ltp_compress.stages.context import StageContext
    from ltp_compress.tasks.glue import get_task

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"""
name: d
model: {teacher}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 64, max_dev_examples: 32, max_validation_examples: 32}}
stages:
  - {{id: teacher, stage: finetune}}
  - {cfg_yaml}
""")
    recipe = load_recipe(recipe_path)
    task = get_task("sst2")
    log = logging.getLogger("test_distill")
    data, _ = load_task_data(recipe, task, load_tokenizer(str(teacher)), log)
    teacher_stage = tmp_path / "stages" / "00-teacher"
    shutil.copytree(teacher, teacher_stage / "model")
    out = tmp_path / "stages" / ".tmp-01-kd"
    out.mkdir(parents=True)
    ctx = StageContext(task=task, data=data, out_dir=out, final_dir=tmp_path / "stages" / "01-kd", source_model=str(student),
                       stage_models={"teacher": str(teacher_stage / "model"), "model": str(teacher)}, seed=0, log=log,
                       max_seq_length=recipe.data.max_seq_length, progress=False)
    return recipe.stages[1], ctx


@pytest.mark.parametrize("quant_aware", [False, True])
def test_distill_stage_trains_pruned_student(tmp_path, quant_aware):
    from ltp_compress.stages import distill

    teacher = build_tiny_model(tmp_path / "teacher", seed=1)
    student = build_tiny_model(tmp_path / "student", seed=2)
    (student / "pruning.json").write_text(json.dumps({"mode": "threshold", "thresholds": [1.0, 1.0], "keep_ratios": None}))
    cfg, ctx = _context(tmp_path, student, teacher,
                        "{id: kd, stage: distill, kd_teacher: teacher, epochs: 1, batch_size: 16, lr: 1.0e-3, "
                        f"kd_alpha: 0.5, quant_aware: {str(quant_aware).lower()}}}")
    result = distill.run(cfg, ctx)
    out = ctx.out_dir / "model"
    assert (out / "model.safetensors").is_file() and json.loads((out / "pruning.json").read_text())["mode"] == "threshold"
    before, after = load_file(str(student / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)  # plain float checkpoint, same keys (QAT leaves no trace)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[key], after[key])
    assert result.extra["train_steps"] == 4 and result.cost["relative_flops"] <= 1.0
    h = result.extra["history"][-1]
    assert all(math.isfinite(h[k]) for k in ("task", "kd_logit", "kd_embedding"))
    if quant_aware:
        scales = json.loads((out / "act_scales.json").read_text())["act_scales"]
        assert len(scales) == 14 and all(v > 0 for v in scales.values())
        assert "fake_quant_validation" in result.extra
    else:
        assert not (out / "act_scales.json").exists()


def test_run_folder_from_before_the_kd_rename_resumes(tmp_path, tiny_bert):
    """A distill stage finished before `teacher` / `alpha` became `kd_teacher` / `kd_alpha` stored
    the old keys in its meta.json: the same recipe in the new spelling resumes it (a renamed key is
    not a change); a really changed value still needs --overwrite."""
    from ltp_compress.pipeline.run_dir import RunError
    from ltp_compress.pipeline.runner import run_recipe

    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "kd.yaml", f"""\
name: kd
model: {tiny_bert}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 32, max_dev_examples: 16, max_seq_length: 32}}
seed: 0
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
  - {{id: kd, stage: distill, kd_teacher: model, kd_alpha: 0.3, epochs: 1, batch_size: 16}}
""")
    run_dir = run_recipe(recipe, progress=False)
    meta_file = run_dir / "stages" / "00-kd" / "meta.json"
    meta = json.loads(meta_file.read_text())
    cfg = meta["config"]
    meta["config"] = {{"kd_teacher": "teacher", "kd_alpha": "alpha"}.get(k, k): v for k, v in cfg.items()}
    meta_file.write_text(json.dumps(meta))
    written = meta_file.stat().st_mtime_ns
    assert run_recipe(recipe, progress=False) == run_dir  # resumed: the finished stage is kept
    assert meta_file.stat().st_mtime_ns == written
    assert "stage kd (distill): already finished, skipped" in (run_dir / "logs" / "run.log").read_text()
    with pytest.raises(RunError, match=r"changed: stages\[0\] \(kd\)"):
        run_recipe(recipe, ["stages.kd.kd_alpha=0.5"], progress=False)
