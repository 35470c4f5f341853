"""The ToP baseline stage `top_prune` (stages/top_prune.py): its config, the hard-concrete gates,
the expected-FLOPs function against the accountant, the gated forward against top-k, and short runs
on the tiny 2-layer models that land the target and deploy as a plain top-k checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def test_config_is_strict_and_needs_a_target(tmp_path, tiny_bert):
    from pydantic import ValidationError

    from conftest import DEMO_DATA, write_recipe

    from ltp_compress.errors import UserError
    from ltp_compress.pipeline.recipe import load_recipe
    from ltp_compress.stages import MODEL_STAGES, STAGE_TYPES
    from ltp_compress.stages.configs import TopPruneStage

    assert STAGE_TYPES["top_prune"].function == "top_prune:run" and "top_prune" in MODEL_STAGES
    ok = TopPruneStage(id="t", stage="top_prune", target_flops=0.5)
    assert ok.rank_bins == 20 and ok.gate_temperature == pytest.approx(2 / 3) and ok.rank_distill_weight == 0
    with pytest.raises(ValidationError, match="target_flops"):
        TopPruneStage(id="t", stage="top_prune")
    with pytest.raises(ValidationError, match="target_flops"):
        TopPruneStage(id="t", stage="top_prune", target_flops=1.5)
    head = f"""\
name: tp
model: {tiny_bert}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 32, max_dev_examples: 16, max_seq_length: 32}}
output_dir: {tmp_path / 'runs'}
stages:
  - {{id: ft, stage: finetune, epochs: 1, batch_size: 16}}
"""
    good = write_recipe(tmp_path / "ok.yaml", head + "  - {id: top, stage: top_prune, target_flops: 0.5, kd_teacher: ft, "
                                                     "rank_distill_weight: 0.5}\n")
    assert load_recipe(good).stages[1].stage == "top_prune"
    unknown = write_recipe(tmp_path / "a.yaml", head + "  - {id: top, stage: top_prune, target_flops: 0.5, bins: 10}\n")
    with pytest.raises(UserError, match="bins"):
        load_recipe(unknown)
    no_target = write_recipe(tmp_path / "b.yaml", head + "  - {id: top, stage: top_prune}\n")
    with pytest.raises(UserError, match="target_flops"):
        load_recipe(no_target)
    no_teacher = write_recipe(tmp_path / "c.yaml", head + "  - {id: top, stage: top_prune, target_flops: 0.5, rank_distill_weight: 0.1}\n")
    with pytest.raises(UserError, match="rank_distill_weight > 0 needs kd_teacher"):
        load_recipe(no_teacher)


def test_hard_concrete_open_probability_matches_monte_carlo():
    from ltp_compress.stages.top_prune import open_probability, sample_gates

    torch.manual_seed(0)
    beta = 2 / 3
    log_alpha = torch.tensor([-4.0, -1.5, 0.0, 1.0, 3.0])
    draws = sample_gates(log_alpha.expand(200_000, -1).contiguous(), beta)
    assert draws.min() == 0.0 and draws.max() == 1.0  # exact zeros and ones: an L0 gate
    mc = (draws > 0).float().mean(0)
    assert torch.allclose(mc, open_probability(log_alpha, beta), atol=4e-3), (mc, open_probability(log_alpha, beta))
    # the stretch matters: sigmoid(log α) alone is far off
    assert (mc - torch.sigmoid(log_alpha)).abs().max() > 0.1
    # differentiable in log α
    la = torch.zeros(3, requires_grad=True)
    sample_gates(la, beta).sum().backward()
    assert la.grad is not None


def test_expected_flops_equals_the_accountant_for_fixed_fractions():
    from ltp_compress.modeling.accounting import EncoderShape, relative_flops
    from ltp_compress.stages.top_prune import expected_relative_flops

    rng = np.random.default_rng(0)
    shape = EncoderShape(num_layers=4, hidden=48, intermediate=96)
    lengths = rng.integers(2, 60, size=37)
    fractions = np.array([0.9, 0.6, 0.75])
    kept = np.cumprod(fractions)
    tokens = np.concatenate([lengths[:, None], 1 + (lengths[:, None] - 1) * kept[None, :]], axis=1).astype(np.float64)
    for convention in ("executed", "paper"):
        f = torch.tensor(fractions, requires_grad=True)
        got = expected_relative_flops(f, torch.as_tensor(lengths), shape, convention)
        assert got.item() == pytest.approx(relative_flops(tokens, lengths, shape, convention), rel=1e-12)
        got.backward()
        assert (f.grad > 0).all()  # keeping more costs more, at every layer
    ones = expected_relative_flops(torch.ones(3), torch.as_tensor(lengths), shape)
    assert float(ones) == pytest.approx(1.0)
    # 'paper' charges the output projection at the tokens entering: more than 'executed' when pruning
    t = torch.tensor(fractions)
    assert float(expected_relative_flops(t, torch.as_tensor(lengths), shape, "paper")) > float(
        expected_relative_flops(t, torch.as_tensor(lengths), shape, "executed"))


def test_landing_scales_the_fractions_onto_the_target():
    """One common scale of the deterministic fractions lands a top-k target; a layer whose bins are
    all closed (fraction 0) can still be raised; a target below one token per layer is an error."""
    from ltp_compress.errors import UserError
    from ltp_compress.modeling.accounting import EncoderShape, relative_flops
    from ltp_compress.modeling.pruned_encoder import topk_tokens_per_layer
    from ltp_compress.stages.top_prune import keep_ratios_from_fractions, land_keep_ratios

    shape = EncoderShape(num_layers=3, hidden=32, intermediate=64)
    lengths = np.random.default_rng(1).integers(5, 64, size=300)
    assert keep_ratios_from_fractions([0.5, 0.5]) == [0.5, 0.25, 0.25]
    for fractions in ([0.0, 1.0], [0.8, 0.5], [1.0, 1.0]):
        for target in (0.35, 0.7):
            ratios, info = land_keep_ratios(fractions, lengths, shape, target, "executed")
            assert info["within_tolerance"] and abs(info["relative_flops"] - target) <= 0.01, (fractions, target, info)
            assert info["relative_flops"] == relative_flops(topk_tokens_per_layer(lengths, ratios), lengths, shape, "executed")
            assert len(ratios) == 3 and ratios[0] >= ratios[1] == ratios[2]
    with pytest.raises(UserError, match="below what top-k pruning can reach"):
        land_keep_ratios([0.5, 0.5], lengths, shape, 0.05, "executed")


def test_gated_token_mask_bins_by_relative_rank():
    from ltp_compress.stages.top_prune import gated_token_mask

    # position 0 and a padded position are not ranked; 4 present tokens ranked by score: 2, 4, 1, 3
    score = torch.tensor([[9.0, 0.3, 0.9, 0.1, 0.5, 0.0]])
    present = torch.tensor([[True, True, True, True, True, False]])
    z_token = torch.tensor([1.0, 0.0])  # bin 0 (ranks 0, 1) open, bin 1 (ranks 2, 3) closed
    m = gated_token_mask(score, present, torch.tensor(1.0), z_token)
    assert m[0, 1:5].tolist() == [0.0, 1.0, 0.0, 1.0]
    # a closed layer gate keeps every token, whatever the bins say
    assert gated_token_mask(score, present, torch.tensor(0.0), z_token)[0, 1:5].tolist() == [1.0] * 4
    # soft gates interpolate: 1 - z_l·(1 - z_k)
    soft = gated_token_mask(score, present, torch.tensor(0.5), torch.tensor([0.8, 0.2]))
    assert soft[0, 1:5].tolist() == pytest.approx([0.6, 0.9, 0.6, 0.9])


def test_gated_forward_with_binary_gates_equals_topk(tiny_bert):
    """Binary gates keeping the top half of the ranked tokens are the top-k rule with ratio 1/2 (odd
    lengths: CLS + half of the others = ceil(n0/2)); all-open gates are the dense model."""
    from ltp_compress.modeling.model_io import load_classifier
    from ltp_compress.modeling.pruned_encoder import forward_masked
    from ltp_compress.stages.top_prune import gated_token_mask
    from ltp_compress.tasks.glue import get_task

    model = load_classifier(str(tiny_bert), get_task("sst2")).eval()
    torch.manual_seed(1)
    lengths = torch.tensor([9, 7, 5])
    ids = torch.randint(10, 200, (3, 9))
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    tt = torch.zeros_like(ids)

    def gated(z_layer, z_token):
        return forward_masked(model, ids, mask, tt, mode="gated",
                              token_masks=lambda l, s, alive: gated_token_mask(s, alive > 0, torch.tensor(z_layer), z_token))

    with torch.no_grad():
        half = gated(1.0, torch.tensor([1.0, 1.0, 0.0, 0.0]))
        topk = forward_masked(model, ids, mask, tt, mode="topk", keep_ratios=[0.5, 0.5])
        assert half.soft_masks[0].sum(1).tolist() == [5.0, 4.0, 3.0]
        dense = forward_masked(model, ids, mask, tt, mode="dense")
        open_ = gated(0.0, torch.zeros(4))
    # the random tiny model's logits are ~1e-3: agreement to 1e-7, pruning moves them by > 1e-5
    assert (half.logits - topk.logits).abs().max() < 1e-7 and (open_.logits - dense.logits).abs().max() < 1e-7
    assert (half.logits - dense.logits).abs().max() > 1e-5


def _run(tmp_path, model, stages: str):
    from test_ltp import _tiny_target_recipe

    from ltp_compress.pipeline.runner import run_recipe

    return run_recipe(_tiny_target_recipe(tmp_path, model, 48, stages), progress=False)


def _meta(run_dir, folder: str) -> dict:
    return json.loads((run_dir / "stages" / folder / "meta.json").read_text())


def _deployed_runtimes_agree(model_dir) -> None:
    """The saved model is a plain top-k checkpoint: the packed runtime and the masked top-k forward
    give the same logits, and its kept tokens are the top-k counts of the lengths."""
    from ltp_compress.modeling.model_io import load_stage_model
    from ltp_compress.modeling.pruned_encoder import forward_masked, forward_packed, topk_tokens_per_layer
    from ltp_compress.tasks.glue import get_task

    model, tok, pruning = load_stage_model(model_dir, get_task("sst2"))
    assert pruning.mode == "topk" and len(pruning.keep_ratios) == model.config.num_hidden_layers
    texts = ["a gorgeous , witty , seductive movie .", "bad", "the film is strictly routine , and it drags on far too long .",
             "an utterly charming and hilarious film that reminded me of the best of them ."]
    enc = tok(texts, padding=True, return_tensors="pt")
    tt = enc.get("token_type_ids")
    model.eval()
    with torch.no_grad():
        packed = forward_packed(model, enc["input_ids"], enc["attention_mask"], tt, pruning, return_kept=True)
        masked = forward_masked(model, enc["input_ids"], enc["attention_mask"], tt, mode="topk", keep_ratios=pruning.keep_ratios)
    assert torch.allclose(packed.logits, masked.logits, atol=1e-5)
    lengths = enc["attention_mask"].sum(1).numpy()
    assert packed.kept_tokens.numpy().tolist() == topk_tokens_per_layer(lengths, pruning.keep_ratios).astype(int).tolist()
    assert (packed.kept_tokens[:, 1] < packed.kept_tokens[:, 0]).any()  # it prunes


def test_top_prune_lands_the_target_and_deploys_as_topk(tmp_path, tiny_bert):
    """Two epochs of the gate phase + one of finetuning on 128 examples: the Lagrangian pulls the
    expected FLOPs down towards the target (λ1 rises by ascent while F̂ is above it), the deployed
    top-k rule lands on validation within ±0.01, and the checkpoint runs on the top-k runtimes. A
    second stage distils the teacher's ranking (its loss is logged; the first stage has none)."""
    run_dir = _run(tmp_path, tiny_bert, """\
  - {id: top, stage: top_prune, init_from: ft, epochs: 2, batch_size: 16, target_flops: 0.5, reg_lr: 0.5, rank_bins: 8,
     lagrangian_warmup: 0.25, finetune_epochs: 1, lr: 1.0e-3}
  - {id: top_rd, stage: top_prune, init_from: ft, epochs: 1, batch_size: 16, target_flops: 0.6, reg_lr: 0.3, rank_bins: 8,
     finetune_epochs: 0, kd_teacher: ft, rank_distill_weight: 1.0, rank_distill_topk: 4, flops_convention: paper}
""")
    meta = _meta(run_dir, "01-top")
    extra = meta["extra"]
    target = extra["flops_target"]
    assert target["target_flops"] == 0.5 and target["calibration_inputs"] == "validation"
    assert abs(target["validation_relative_flops"] - 0.5) <= 0.01, target
    landing = extra["landing"]
    assert landing["within_tolerance"] and landing["relative_flops"] == pytest.approx(target["validation_relative_flops"])
    assert extra["pruning"] == {"mode": "topk", "thresholds": None, "keep_ratios": landing["keep_ratios_after"]}
    # the constraint: expected FLOPs fell towards the target; λ1 rose (ascent) while F̂ was above it
    gates = extra["gates"]
    assert gates["expected_flops_end"] < gates["expected_flops_start"] - 0.02, gates
    assert [m["epoch"] for m in extra["lagrange_multipliers"]] == [1, 2]
    assert all(m["lambda_1"] > 0 and m["lambda_2"] > 0 for m in extra["lagrange_multipliers"])
    hist = extra["gate_history"]
    assert [h["step"] for h in hist] == [8, 16] and hist[-1]["target_now"] == pytest.approx(0.5)
    assert hist[-1]["rank_loss"] is None and len(gates["layer_open"]) == 1 and len(gates["token_open_probability"][0]) == 8
    assert [h["step"] for h in extra["finetune_history"]] == [8] and extra["train_steps"] == 8
    _deployed_runtimes_agree(run_dir / "stages" / "01-top" / "model")

    rd = _meta(run_dir, "02-top_rd")["extra"]
    assert rd["gate_history"][-1]["rank_loss"] > 0 and rd["finetune_history"] == []
    assert rd["flops_target"]["convention"] == "paper" and abs(rd["flops_target"]["validation_relative_flops"] - 0.6) <= 0.01
    assert "top_rd" in (run_dir / "report.md").read_text()


def test_top_prune_on_roberta(tmp_path, tiny_roberta):
    """RoBERTa: lands and deploys the same way; an unreachable target (below one token kept after
    every layer) stops its stage before training, naming the key."""
    from ltp_compress.errors import UserError

    with pytest.raises(UserError, match=r"stage 'low': target_flops 0.05 is below what top-k pruning can reach"):
        _run(tmp_path, tiny_roberta, """\
  - {id: top, stage: top_prune, init_from: ft, epochs: 1, batch_size: 16, target_flops: 0.55, reg_lr: 0.3, rank_bins: 8,
     finetune_epochs: 0}
  - {id: low, stage: top_prune, init_from: ft, epochs: 1, batch_size: 16, target_flops: 0.05}
""")
    run_dir = tmp_path / "runs" / "tf"
    extra = _meta(run_dir, "01-top")["extra"]
    assert abs(extra["flops_target"]["validation_relative_flops"] - 0.55) <= 0.01
    assert extra["gates"]["expected_flops_end"] < extra["gates"]["expected_flops_start"]
    _deployed_runtimes_agree(run_dir / "stages" / "01-top" / "model")


def test_killed_gate_phase_resumes_bitwise(tmp_path, tiny_bert, monkeypatch):
    """The gate phase checkpoints weights, gates, λ's and their optimizers: killed after step 3 and
    rerun, it resumes at its step-2 checkpoint and ends bitwise like an uninterrupted run."""
    from safetensors.torch import load_file

    from ltp_compress.stages import distributed as dist

    stage = """\
  - {id: top, stage: top_prune, init_from: ft, epochs: 1, batch_size: 16, target_flops: 0.5, reg_lr: 0.5, rank_bins: 8,
     finetune_epochs: 0, checkpoint_every_steps: 2}
"""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = _run(tmp_path / "a", tiny_bert, stage)
    monkeypatch.setenv(dist.ENV_FAIL_AT, "top:3")
    with pytest.raises(RuntimeError, match="injected failure after step 3 of stage top"):
        _run(tmp_path / "b", tiny_bert, stage)
    monkeypatch.delenv(dist.ENV_FAIL_AT)
    killed = _run(tmp_path / "b", tiny_bert, stage)
    assert "top: resuming from the checkpoint at step 2" in (killed / "logs" / "run.log").read_text()
    a, b = _meta(straight, "01-top")["extra"], _meta(killed, "01-top")["extra"]
    for h in a["gate_history"] + b["gate_history"]:
        h["validation"].pop("examples_per_s")  # timing
    assert a["gates"] == b["gates"]
    assert a["landing"] == b["landing"]
    assert a["gate_history"] == b["gate_history"]
    wa, wb = (load_file(str(r / "stages" / "01-top" / "model" / "model.safetensors")) for r in (straight, killed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
