"""Ranking distillation (stages/rank_distill.py): the loss against its plain reference, the scores
it reads against Hugging Face's attention probabilities, and the option in ltp_soft / ltp_hard."""

from __future__ import annotations

import json

import pytest
import torch

from ltp_compress.stages.rank_distill import listmle_topk, listmle_topk_reference, rank_distill_loss


def _random_case(seed: int, b: int = 5, s: int = 9):
    g = torch.Generator().manual_seed(seed)
    student = torch.rand(b, s, generator=g) * 3 + 1e-3
    teacher = torch.rand(b, s, generator=g)
    listed = torch.rand(b, s, generator=g) > 0.3
    listed[0] = False  # an example with nothing to rank
    listed[1] = False
    listed[1, 2] = True  # and one with a single token
    student[2, 3] = 0.0  # a token pruned before this layer (score exactly 0): left out
    return student, teacher, listed


@pytest.mark.parametrize("topk", [2, 4, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_listmle_topk_matches_the_plain_reference(seed, topk):
    student, teacher, listed = _random_case(seed)
    got = listmle_topk(student, teacher, listed, topk)
    want = listmle_topk_reference(student, teacher, listed, topk)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got[0] == 0 and got[1] == 0


def test_listmle_rewards_the_teacher_order_and_its_gradient_moves_towards_it():
    teacher = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    listed = torch.tensor([[False, True, True, True, True, True]])
    agree = torch.tensor([[1.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    reverse = torch.tensor([[1.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    assert listmle_topk(agree, teacher, listed, 5) < listmle_topk(reverse, teacher, listed, 5)
    # gradient descent on the student's log-scores reorders them like the teacher's
    logits = torch.log(reverse).clone().requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        listmle_topk(logits.exp(), teacher, listed, 5).sum().backward()
        opt.step()
    order = logits.detach()[0, 1:].argsort(descending=True).tolist()
    assert order == [0, 1, 2, 3, 4]  # token 1 first ... token 5 last, the teacher's order


def test_rank_distill_loss_skips_position_0_and_padding():
    s = torch.tensor([[9.0, 1.0, 2.0, 3.0, 0.5]])
    t = torch.tensor([[9.0, 3.0, 2.0, 1.0, 7.0]])  # position 0 and the padded position would lead if listed
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    got = rank_distill_loss([s], t, mask, [0], topk=20)
    listed = torch.tensor([[False, True, True, True, False]])
    assert float(got) == pytest.approx(listmle_topk_reference(s, t, listed, 20)[0], rel=1e-6)


def test_forward_scores_are_the_attention_received_from_hf_attention_probabilities(tiny_bert):
    """`return_scores`: score_l(i) = 1/H Σ_h Σ_{j present} A_h(j, i) at every layer, the last included."""
    from transformers import AutoModelForSequenceClassification

    from ltp_compress.modeling.pruned_encoder import forward_masked

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 60, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ours = forward_masked(model, ids, mask, None, mode="dense", return_scores=True).scores
        hf = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(ours) == model.config.num_hidden_layers == len(hf)
    for score, probs in zip(ours, hf):  # probs [b, H, s, s]
        want = (probs * mask[:, None, :, None]).sum(dim=(1, 2)) / probs.shape[1]
        torch.testing.assert_close(score * mask, want * mask, rtol=1e-4, atol=1e-5)


def test_rank_distill_needs_a_teacher_and_a_pruning_layer(tmp_path, tiny_bert):
    from conftest import DEMO_DATA, write_recipe

    from ltp_compress.errors import UserError
    from ltp_compress.pipeline.recipe import load_recipe
    from ltp_compress.pipeline.runner import run_recipe

    head = f"""\
name: rd
model: {tiny_bert}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 32, max_dev_examples: 16, max_seq_length: 32}}
output_dir: {tmp_path / 'runs'}
stages:
  - {{id: ft, stage: finetune, epochs: 1, batch_size: 16}}
"""
    bad = write_recipe(tmp_path / "a.yaml", head + "  - {id: soft, stage: ltp_soft, rank_distill_weight: 0.1}\n")
    with pytest.raises(UserError, match="rank_distill_weight > 0 needs kd_teacher"):
        load_recipe(bad)
    # the tiny model has 2 layers: only layer 0 prunes; refused before any training of the stage
    late = write_recipe(tmp_path / "b.yaml", head + "  - {id: soft, stage: ltp_soft, kd_teacher: ft, rank_distill_weight: 0.1, "
                                                    "rank_distill_layers: [1]}\n")
    with pytest.raises(UserError, match=r"rank_distill_layers \[1\].*prune are 0 \.\. 0"):
        run_recipe(late, progress=False)


def test_soft_and_hard_stages_train_with_ranking_distillation(tmp_path, tiny_bert):
    """The option runs in both phases, logs its loss per epoch, and changes the training (a weight of
    0 gives other thresholds than a large one, from the same seed)."""
    from test_ltp import _tiny_target_recipe

    from ltp_compress.pipeline.runner import run_recipe

    recipe = _tiny_target_recipe(tmp_path, tiny_bert, 32, """\
  - {id: soft, stage: ltp_soft, init_from: ft, epochs: 1, batch_size: 16, kd_teacher: ft, rank_distill_weight: 1.0}
  - {id: hard, stage: ltp_hard, epochs: 1, batch_size: 16, kd_teacher: ft, rank_distill_weight: 1.0, rank_distill_topk: 4}
  - {id: soft0, stage: ltp_soft, init_from: ft, epochs: 1, batch_size: 16, kd_teacher: ft}
""")
    run_dir = run_recipe(recipe, progress=False)
    soft = json.loads((run_dir / "stages" / "01-soft" / "meta.json").read_text())["extra"]
    soft0 = json.loads((run_dir / "stages" / "03-soft0" / "meta.json").read_text())["extra"]
    assert soft["history"][-1]["rank_loss"] > 0 and soft0["history"][-1]["rank_loss"] is None
    assert soft["pruning"]["thresholds"] != soft0["pruning"]["thresholds"]
    assert (run_dir / "stages" / "02-hard" / "model").is_dir()
