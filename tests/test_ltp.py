"""Learned Token Pruning forward passes (modeling/pruned_encoder.py).

Reference: `forward_masked` (padded batch, pruned tokens masked out of attention). The packed
path (`forward_packed`, pruned tokens physically removed) must give the same logits on the same
inputs. Tolerance for packed vs masked and for dense vs Hugging Face: atol 1e-5 on logits in
float32 (the two paths run the same ops on the same values; only the matmul shapes — and so the
summation order inside BLAS — differ, which moves float32 results by ~1e-7).

Random tiny models with the default init (std 0.02) have almost uniform attention (every score
≈ 1.0 ± 0.005), so thresholds would sit on top of near-ties. The 4-layer models below use
initializer_range 0.2, which spreads scores over ~0.5..2, and every threshold test first checks
that no score lies within 1e-5 of its threshold (scores differ between the two paths by ~1e-7, so
a kept/pruned decision cannot flip by rounding).
"""

from __future__ import annotations

import math

import pytest
import torch

from ltp_compress.modeling.pruned_encoder import (
    PruningConfig, encoder_layers, forward_masked, forward_packed, linear_threshold_init, topk_keep_ratios,
)

ATOL = 1e-5

TEXTS = [
    "it 's a charming and often affecting journey .",
    "bleak",
    "the part where nothing 's happening , and it goes on and on for a while before the end",
    "lend some dignity to a dumb story",
    "a gorgeous , witty , seductive movie .",
]


def _tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _hf_model(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()


def _deep_model(folder, layers=4, init=0.2, seed=0):
    """A random model with the folder's config but `layers` layers and a wide init (spread scores)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(folder)
    cfg.num_hidden_layers = layers
    cfg.initializer_range = init
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager").eval()


def _batch(folder, texts=TEXTS):
    enc = _tok(folder)(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")


@pytest.fixture(scope="module", params=["bert", "roberta"])
def deep(request, tiny_bert, tiny_roberta):
    folder = tiny_bert if request.param == "bert" else tiny_roberta
    return _deep_model(folder), _batch(folder)


def _masked_trace(model, ids, mask, tt, **kw):
    """Run forward_masked and record, per layer, the attention probabilities (via a hook on the
    attention dropout, which receives them). From them: the keep mask entering each layer (a key
    column is present iff the always-present [CLS] query gives it non-zero probability) and the
    importance score of each token (mean over heads, summed over present queries)."""
    probs = []
    hooks = [l.attention.self.dropout.register_forward_hook(lambda m, i, o: probs.append(i[0].detach()))
             for l in encoder_layers(model)]
    try:
        with torch.no_grad():
            out = forward_masked(model, ids, mask, tt, **kw)
    finally:
        for h in hooks:
            h.remove()
    heads = model.config.num_attention_heads
    alive = [(p[:, 0, 0, :] > 0) & mask.bool() for p in probs]  # [b, s] per layer
    scores = [(p * a[:, None, :, None].to(p.dtype)).sum(dim=(1, 2)) / heads for p, a in zip(probs, alive)]
    return out, alive, scores


# ----------------------------------------------------------------------------- (a) dense == HF


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_dense_masked_equals_hf_logits(kind, tiny_bert, tiny_roberta):
    folder = tiny_bert if kind == "bert" else tiny_roberta
    model = _hf_model(folder)
    ids, mask, tt = _batch(folder)
    assert mask.sum(1).min() < mask.shape[1]  # the batch really has padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        out = forward_masked(model, ids, mask, tt, mode="dense")
    assert out.logits.shape == ref.shape == (len(TEXTS), 2)
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)
    # dense: every real token enters every layer
    assert out.kept_tokens.tolist() == [[n] * model.config.num_hidden_layers for n in mask.sum(1).tolist()]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_dense_equals_hf_on_wide_4_layer_model(kind, tiny_bert, tiny_roberta):
    folder = tiny_bert if kind == "bert" else tiny_roberta
    model = _deep_model(folder)
    ids, mask, tt = _batch(folder)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        dense = forward_masked(model, ids, mask, tt, mode="dense").logits
        packed = forward_packed(model, ids, mask, tt, PruningConfig()).logits
    torch.testing.assert_close(dense, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed, ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- (b) packed == masked


THRESHOLDS = [0.9, 1.0, 1.1, 1.2]


def test_packed_threshold_equals_masked_hard(deep):
    model, (ids, mask, tt) = deep
    th = torch.tensor(THRESHOLDS)
    ref, alive, scores = _masked_trace(model, ids, mask, tt, mode="hard", thresholds=th)
    # setup sanity: no score within 1e-5 of its threshold for a present token (no rounding flips)
    L = len(THRESHOLDS)
    for l in range(L - 1):
        margin = (scores[l] - THRESHOLDS[l]).abs()[alive[l]]
        assert float(margin.min()) > 1e-5
    out = forward_packed(model, ids, mask, tt, PruningConfig(mode="threshold", thresholds=THRESHOLDS), return_kept=True)
    lengths = mask.sum(1)
    # tokens really are pruned, for several examples and at several depths
    assert (out.kept_tokens[:, -1] < lengths).sum() >= 3
    assert (out.kept_tokens[:, 1:] < out.kept_tokens[:, :-1]).any()
    assert out.kept_tokens[:, 0].tolist() == lengths.tolist()
    assert out.kept_tokens.tolist() == ref.kept_tokens.tolist()
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    # and pruning changed the result (the comparison is not dense vs dense)
    dense = forward_masked(model, ids, mask, tt, mode="dense").logits.detach()
    assert (dense - ref.logits).abs().max() > 1e-3


def test_packed_topk_equals_masked_topk(deep):
    model, (ids, mask, tt) = deep
    ratios = [0.8, 0.6, 0.4, 0.4]
    with torch.no_grad():
        ref = forward_masked(model, ids, mask, tt, mode="topk", keep_ratios=ratios)
    out = forward_packed(model, ids, mask, tt, PruningConfig(mode="topk", keep_ratios=ratios), return_kept=True)
    lengths = mask.sum(1)
    # kept after layer l = ceil(ratio_l * n0), capped by what was present, and at least 1
    expect = [[int(n)] for n in lengths.tolist()]
    for row, n in zip(expect, lengths.tolist()):
        for r in ratios[:-1]:
            row.append(min(row[-1], max(1, math.ceil(n * r))))
    assert out.kept_tokens.tolist() == expect
    assert ref.kept_tokens.tolist() == expect
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)


def test_forward_for_pruning_packed_and_masked_agree(tiny_bert):
    from ltp_compress.modeling.pruned_encoder import forward_for_pruning

    model = _deep_model(tiny_bert)
    ids, mask, tt = _batch(tiny_bert)

    class B:
        pass

    b = B()
    b.input_ids, b.attention_mask, b.token_type_ids = ids, mask, tt
    cfg = PruningConfig(mode="threshold", thresholds=THRESHOLDS)
    packed = forward_for_pruning(model, b, cfg, packed=True, return_kept=True)
    with torch.no_grad():
        masked = forward_for_pruning(model, b, cfg, packed=False)
    assert packed.kept_tokens.tolist() == masked.kept_tokens.tolist()
    torch.testing.assert_close(packed.logits, masked.logits, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- (c) soft gradient


def _soft_loss(model, ids, mask, tt, thresholds, labels, lam, temperature=0.1):
    out = forward_masked(model, ids, mask, tt, mode="soft", thresholds=thresholds, temperature=temperature)
    real = mask.to(out.soft_masks[0].dtype)
    mask_mean = torch.stack([(m * real).sum() / real.sum() for m in out.soft_masks]).mean()
    return torch.nn.functional.cross_entropy(out.logits, labels) + lam * mask_mean, out


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_soft_mask_gradient_reaches_thresholds(kind, tiny_bert, tiny_roberta):
    folder = tiny_bert if kind == "bert" else tiny_roberta
    model = _deep_model(folder).double()
    ids, mask, tt = _batch(folder)
    labels = torch.tensor([1, 0, 0, 1, 1])
    th = torch.tensor(linear_threshold_init(4, 1.28), dtype=torch.float64, requires_grad=True)
    loss, out = _soft_loss(model, ids, mask, tt, th, labels, lam=0.1)
    assert len(out.soft_masks) == 4  # soft mode masks every layer (incl. the last, for the loss)
    loss.backward()
    g = th.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g.abs() > 1e-8).all(), g
    # the gradient is the true derivative: central finite differences in float64
    eps = 1e-5
    for l in range(4):
        with torch.no_grad():
            hi, lo = th.detach().clone(), th.detach().clone()
            hi[l] += eps
            lo[l] -= eps
            fd = (_soft_loss(model, ids, mask, tt, hi, labels, 0.1)[0] - _soft_loss(model, ids, mask, tt, lo, labels, 0.1)[0]) / (2 * eps)
        assert float(g[l]) == pytest.approx(float(fd), rel=1e-4, abs=1e-9)


def test_soft_mask_loss_alone_pushes_thresholds_up(tiny_bert):
    """With only the λ·mean-mask term, raising the last threshold can only lower the loss."""
    model = _deep_model(tiny_bert)
    ids, mask, tt = _batch(tiny_bert)
    th = torch.tensor(linear_threshold_init(4, 1.28), requires_grad=True)
    out = forward_masked(model, ids, mask, tt, mode="soft", thresholds=th, temperature=0.1)
    real = mask.float()
    torch.stack([(m * real).sum() / real.sum() for m in out.soft_masks]).mean().backward()
    assert th.grad[-1] < 0
    assert th.grad.sum() < 0


# ----------------------------------------------------------------------------- (d) pruned stays pruned


def test_packed_rows_entering_each_layer_non_increasing(deep):
    model, (ids, mask, tt) = deep
    rows = []
    hooks = [l.attention.self.query.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
             for l in encoder_layers(model)]
    try:
        out = forward_packed(model, ids, mask, tt, PruningConfig(mode="threshold", thresholds=THRESHOLDS), return_kept=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(rows) == 4
    # the Linear layers see exactly the surviving tokens of the whole batch (packed, no padding)
    assert rows == out.kept_tokens.sum(0).tolist()
    assert rows[0] == int(mask.sum())
    assert all(a >= b for a, b in zip(rows, rows[1:]))
    assert rows[-1] < rows[0]
    k = out.kept_tokens
    assert bool((k[:, 1:] <= k[:, :-1]).all())


def test_pruned_tokens_skip_their_layers_output_projection_and_ffn(deep):
    """A token pruned at layer l is dropped right after l's softmax: layer l's output projection
    and FFN see only the survivors, exactly the counts the FLOPs accountant charges them."""
    from ltp_compress.modeling.accounting import tokens_leaving_layers

    model, (ids, mask, tt) = deep
    rows_o, rows_ffn = [], []
    hooks = []
    for layer in encoder_layers(model):
        hooks.append(layer.attention.output.dense.register_forward_hook(lambda m, i, o: rows_o.append(i[0].shape[0])))
        hooks.append(layer.intermediate.dense.register_forward_hook(lambda m, i, o: rows_ffn.append(i[0].shape[0])))
    try:
        out = forward_packed(model, ids, mask, tt, PruningConfig(mode="threshold", thresholds=THRESHOLDS), return_kept=True)
    finally:
        for h in hooks:
            h.remove()
    expect = tokens_leaving_layers(out.kept_tokens.numpy()).sum(0).astype(int).tolist()
    assert rows_o == rows_ffn == expect
    assert rows_o[0] < int(mask.sum())  # layer 0 already pruned before its FFN
    assert rows_o[-1] == int(out.kept_tokens[:, -1].sum())  # the last layer prunes nothing


def test_masked_hard_keep_masks_non_increasing_per_token(deep):
    model, (ids, mask, tt) = deep
    # thresholds that are NOT monotone in depth: a token pruned early would come back if the rule
    # were applied per layer without the cumulative mask
    th = [1.2, 0.6, 1.1, 0.5]
    out, alive, scores = _masked_trace(model, ids, mask, tt, mode="hard", thresholds=torch.tensor(th))
    assert alive[0].tolist() == mask.bool().tolist()
    for l in range(1, 4):
        assert not bool((alive[l] & ~alive[l - 1]).any()), f"token revived at layer {l}"
        # position 0 always present
        assert bool(alive[l][:, 0].all())
    # some token has a score above layer-1's low threshold but was pruned at layer 0 -> stays out
    revivable = (~alive[1]) & mask.bool() & (scores[1] > th[1])
    # scores of pruned tokens are zero (no present query attends to them)
    assert float(scores[1][~alive[1] & mask.bool()].abs().max()) == 0.0
    assert int((~alive[1] & mask.bool()).sum()) > 0
    assert not bool(revivable.any())
    assert out.kept_tokens.tolist() == torch.stack([a.sum(1) for a in alive], 1).tolist()
    packed = forward_packed(model, ids, mask, tt, PruningConfig(mode="threshold", thresholds=th), return_kept=True)
    assert packed.kept_tokens.tolist() == out.kept_tokens.tolist()
    torch.testing.assert_close(packed.logits, out.logits, atol=ATOL, rtol=0)


def test_soft_masks_cumulative_non_increasing(deep):
    model, (ids, mask, tt) = deep
    with torch.no_grad():
        out = forward_masked(model, ids, mask, tt, mode="soft", thresholds=torch.tensor(THRESHOLDS), temperature=0.1)
    real = mask.bool()
    prev = mask.float()
    for m in out.soft_masks:
        assert bool((m[real] <= prev[real] + 1e-7).all())
        assert bool((m >= 0).all())
        prev = m
    assert float(out.soft_masks[-1][real].min()) < 0.5  # something is (softly) pruned


# ----------------------------------------------------------------------------- (e) [CLS] never pruned


def test_cls_never_pruned_with_huge_threshold(deep):
    model, (ids, mask, tt) = deep
    huge = [1e6] * 4
    out = forward_packed(model, ids, mask, tt, PruningConfig(mode="threshold", thresholds=huge), return_kept=True)
    b = ids.shape[0]
    assert out.kept_tokens[:, 0].tolist() == mask.sum(1).tolist()
    assert out.kept_tokens[:, 1:].tolist() == [[1, 1, 1]] * b
    assert out.logits.shape == (b, 2) and torch.isfinite(out.logits).all()
    ref, alive, _ = _masked_trace(model, ids, mask, tt, mode="hard", thresholds=torch.tensor(huge))
    for l in range(1, 4):
        assert alive[l].sum(1).tolist() == [1] * b and bool(alive[l][:, 0].all())
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    # soft mode: the [CLS] mask stays exactly 1
    with torch.no_grad():
        soft = forward_masked(model, ids, mask, tt, mode="soft", thresholds=torch.tensor(huge), temperature=0.1)
    for m in soft.soft_masks:
        assert m[:, 0].tolist() == [1.0] * b
        assert float(m[:, 1:].max()) < 1e-6
    assert torch.isfinite(soft.logits).all()


def test_topk_tiny_ratio_keeps_only_cls(deep):
    model, (ids, mask, tt) = deep
    out = forward_packed(model, ids, mask, tt, PruningConfig(mode="topk", keep_ratios=[1e-6] * 4), return_kept=True)
    assert out.kept_tokens[:, 1:].tolist() == [[1, 1, 1]] * ids.shape[0]
    with torch.no_grad():
        ref = forward_masked(model, ids, mask, tt, mode="topk", keep_ratios=[1e-6] * 4)
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- (f) padding independence


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_scores_independent_of_batch_padding(deep, mode):
    model, (ids, mask, tt) = deep
    lengths = mask.sum(1)
    short, long_ = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[short] < lengths[long_]
    cfg = (PruningConfig(mode="threshold", thresholds=THRESHOLDS) if mode == "threshold"
           else PruningConfig(mode="topk", keep_ratios=[0.7, 0.5, 0.3, 0.3]))
    n = int(lengths[short])
    alone = [t[short:short + 1, :n] if t is not None else None for t in (ids, mask, tt)]
    pair = [t[[short, long_]] if t is not None else None for t in (ids, mask, tt)]
    a = forward_packed(model, *alone, cfg, return_kept=True)
    p = forward_packed(model, *pair, cfg, return_kept=True)
    assert p.kept_tokens[0].tolist() == a.kept_tokens[0].tolist()
    torch.testing.assert_close(p.logits[0], a.logits[0], atol=ATOL, rtol=0)
    mode_m = "hard" if mode == "threshold" else "topk"
    kw = dict(thresholds=torch.tensor(THRESHOLDS)) if mode == "threshold" else dict(keep_ratios=cfg.keep_ratios)
    with torch.no_grad():
        am = forward_masked(model, *alone, mode=mode_m, **kw)
        pm = forward_masked(model, *pair, mode=mode_m, **kw)
    assert pm.kept_tokens[0].tolist() == am.kept_tokens[0].tolist() == a.kept_tokens[0].tolist()
    torch.testing.assert_close(pm.logits[0], am.logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(pm.logits[0], a.logits[0], atol=ATOL, rtol=0)
    if mode == "threshold":
        assert a.kept_tokens[0, -1] < n  # the short example itself is pruned


def test_soft_scores_independent_of_batch_padding(deep):
    model, (ids, mask, tt) = deep
    lengths = mask.sum(1)
    short, long_ = int(lengths.argmin()), int(lengths.argmax())
    n = int(lengths[short])
    th = torch.tensor(THRESHOLDS)
    with torch.no_grad():
        a = forward_masked(model, *[t[short:short + 1, :n] if t is not None else None for t in (ids, mask, tt)],
                           mode="soft", thresholds=th, temperature=0.1)
        p = forward_masked(model, *[t[[short, long_]] if t is not None else None for t in (ids, mask, tt)],
                           mode="soft", thresholds=th, temperature=0.1)
    for ma, mp in zip(a.soft_masks, p.soft_masks):
        torch.testing.assert_close(mp[0, :n], ma[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(p.logits[0], a.logits[0], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- (g) schedules


def test_linear_threshold_init_values():
    assert linear_threshold_init(4, 1.28) == pytest.approx([0.32, 0.64, 0.96, 1.28])
    assert linear_threshold_init(1, 0.5) == pytest.approx([0.5])
    th = linear_threshold_init(12, 1.28)
    assert len(th) == 12 and th[-1] == pytest.approx(1.28) and th[0] == pytest.approx(1.28 / 12)
    assert all(b > a for a, b in zip(th, th[1:]))


def test_topk_keep_ratios_values():
    # L=6, 3 dense layers: fraction entering layers 0..5 = 1, 1, 1, 1-0.7/3, 1-1.4/3, 0.3;
    # keep_ratios[l] = fraction entering layer l+1 (last entry = final ratio)
    r = topk_keep_ratios(6, 0.3, 3)
    assert r == pytest.approx([1.0, 1.0, 1 - 0.7 / 3, 1 - 1.4 / 3, 0.3, 0.3])
    # no dense layers: decays from the start
    assert topk_keep_ratios(4, 0.2, 0) == pytest.approx([1 - 0.8 * 2 / 4, 1 - 0.8 * 3 / 4, 0.2, 0.2])
    # dense_layers >= L is clamped to L-1 (the last layer still reaches the final ratio)
    assert topk_keep_ratios(2, 0.5, 3) == pytest.approx([0.5, 0.5])
    r12 = topk_keep_ratios(12, 0.3, 3)
    assert len(r12) == 12 and r12[-2] == pytest.approx(0.3)
    assert all(b <= a for a, b in zip(r12, r12[1:]))


def test_pruning_config_roundtrip():
    cfg = PruningConfig(mode="threshold", thresholds=[0.5, 1.0])
    d = cfg.to_dict()
    assert d == {"mode": "threshold", "thresholds": [0.5, 1.0], "keep_ratios": None}
    assert PruningConfig.from_dict(d) == cfg
    assert PruningConfig.from_dict(None) == PruningConfig()


# ----------------------------------------------------------------------------- target_flops


def test_lambda_steering_is_bounded_per_probe_and_overall():
    from ltp_compress.stages.ltp_soft import _steer_lambda

    assert _steer_lambda(0.2, 0.9, 0.45, 0.2) == pytest.approx(0.25)  # 2x over target -> x1.25 at most
    assert _steer_lambda(0.2, 0.46, 0.45, 0.2) == pytest.approx(0.2 * 0.46 / 0.45)  # small error: proportional
    assert _steer_lambda(0.2, 0.2, 0.45, 0.2) == pytest.approx(0.16)  # far under target -> x0.8
    lam = 0.2
    for _ in range(100):
        lam = _steer_lambda(lam, 0.9, 0.45, 0.2)
    assert lam == pytest.approx(2.0)  # capped at 10·λ0
    for _ in range(200):
        lam = _steer_lambda(lam, 0.1, 0.45, 0.2)
    assert lam == pytest.approx(0.02)  # floored at λ0/10


def test_threshold_offset_calibration_lands_target_along_linear_ramp(deep):
    from ltp_compress.modeling.accounting import EncoderShape, relative_flops
    from ltp_compress.stages.flops_target import calibrate_threshold_offset

    model, (ids, mask, tt) = deep
    from ltp_compress.tasks.data import Batch

    batch = Batch(ids, mask, tt, torch.zeros(len(ids), dtype=torch.long), torch.arange(len(ids)))
    base = PruningConfig(mode="threshold", thresholds=[-0.1, 0.2, 0.3, 0.4])  # one negative: a scale could not move it
    for target in (0.7, 0.5):
        cal, info = calibrate_threshold_offset(model, [batch], base, target)
        moved = [c - b for c, b in zip(cal.thresholds, base.thresholds)]
        assert moved == pytest.approx([info["offset"] * (l + 1) / 4 for l in range(4)])  # along the ramp
        out = forward_packed(model, ids, mask, tt, cal, return_kept=True)
        rel = relative_flops(out.kept_tokens.numpy(), mask.sum(1).numpy(), EncoderShape.from_config(model.config))
        assert rel == pytest.approx(info["relative_flops"])
        # at or just under the target; a few tokens of 6 short examples are the granularity
        assert target - 0.08 <= rel <= target + 1e-9


def test_annealed_schedule_and_follower_track_a_moving_target(deep):
    """The annealed_target controller: the schedule falls linearly to the target and is flat after;
    a few follower steps bring the hard-threshold FLOPs to each schedule point (weights fixed here),
    every move is one offset along the ramp, and a point already within tolerance moves nothing."""
    from ltp_compress.stages.flops_target import ScheduleFollower, annealed_target, ramp, relative_flops_on
    from ltp_compress.tasks.data import Batch

    assert [annealed_target(0.9, 0.4, s, 100, 0.5) for s in (0, 25, 50, 99)] == pytest.approx([0.9, 0.65, 0.4, 0.4])
    model, (ids, mask, tt) = deep
    batch = Batch(ids, mask, tt, torch.zeros(len(ids), dtype=torch.long), torch.arange(len(ids)))
    follower = ScheduleFollower([batch], "executed", tolerance=0.05)
    pruning = PruningConfig(mode="threshold", thresholds=[0.0, 0.05, 0.1, 0.15])
    start = relative_flops_on(model, [batch], pruning)
    for target_now in (start - 0.1, start - 0.2):
        for _ in range(8):
            new, info = follower(model, pruning, target_now)
            if new is None:
                break
            moved = [a - b for a, b in zip(new, pruning.thresholds)]
            assert moved == pytest.approx((info["offset"] * ramp(4)).tolist())
            pruning = PruningConfig(mode="threshold", thresholds=new)
        assert new is None and abs(info["relative_flops"] - target_now) <= 0.05 * target_now, info
    assert follower.slope is not None and follower.slope < 0


def test_follower_floor_gives_tokens_back_below_the_target(deep):
    """lambda_with_bounds: below the schedule the follower leaves the FLOPs to λ (as lambda_with_ceiling)
    unless they are below the final target by more than the tolerance; then one offset (negative:
    less pruning) along the ramp brings them back up to it."""
    from ltp_compress.stages.flops_target import ScheduleFollower, ramp, relative_flops_on
    from ltp_compress.tasks.data import Batch

    model, (ids, mask, tt) = deep
    batch = Batch(ids, mask, tt, torch.zeros(len(ids), dtype=torch.long), torch.arange(len(ids)))
    for scale in (1, 2, 4, 8):  # a rule that prunes deep on this tiny model
        deep_rule = PruningConfig(mode="threshold", thresholds=[scale * t for t in (0.25, 0.5, 0.75, 1.0)])
        low = relative_flops_on(model, [batch], deep_rule)
        if low < 0.7:
            break
    assert low < 0.7
    floor = low + 0.15
    ceiling = ScheduleFollower([batch], "executed", tolerance=0.05, ceiling_only=True)
    assert ceiling(model, deep_rule, floor)[0] is None  # no floor: below the schedule is λ's job
    bounded = ScheduleFollower([batch], "executed", tolerance=0.05, ceiling_only=True, floor=floor)
    pruning = deep_rule
    for _ in range(8):
        new, info = bounded(model, pruning, floor + 0.2)  # the schedule still above the floor
        if new is None:
            break
        assert info["floor"] == floor and info["offset"] < 0
        moved = [a - b for a, b in zip(new, pruning.thresholds)]
        assert moved == pytest.approx((info["offset"] * ramp(4)).tolist())
        pruning = PruningConfig(mode="threshold", thresholds=new)
    rel = relative_flops_on(model, [batch], pruning)
    assert new is None and rel >= floor * (1 - 0.05) and rel < floor + 0.2, rel


def _tiny_target_recipe(tmp_path, model, max_dev: int, stages: str):
    """A tiny-BERT SST-2 recipe with a finetuned `ft` stage followed by `stages` (YAML list items)."""
    from conftest import DEMO_DATA, write_recipe

    return write_recipe(tmp_path / "r.yaml", f"""\
name: tf
model: {model}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 128, max_dev_examples: {max_dev}, max_seq_length: 64}}
seed: 3
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
  - {{id: ft, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3}}
""" + stages)


def test_soft_stage_reports_a_target_it_did_not_reach_and_the_correction_cost(tmp_path, tiny_bert):
    """With the old λ controller and no pressure (λ 0, thresholds all but frozen) training cannot
    reach the target: the stage says so on the console and in report.md, and the correction's
    validation cost is reported; annealed_target reaches it during training, and the default (λ with
    the schedule as a ceiling, here with the same frozen λ) is never above it."""
    import json

    from ltp_compress.pipeline.runner import run_recipe

    recipe = _tiny_target_recipe(tmp_path, tiny_bert, 64, """\
  - {id: stuck, stage: ltp_soft, init_from: ft, epochs: 1, batch_size: 16, target_flops: 0.45, flops_controller: lambda,
     lambda: 0.0, threshold_lr: 1.0e-7}
  - {id: annealed, stage: ltp_soft, init_from: ft, epochs: 2, batch_size: 16, target_flops: 0.45, anneal_until: 0.5,
     flops_controller: annealed_target}
  - {id: ceiling, stage: ltp_soft, init_from: ft, epochs: 2, batch_size: 16, target_flops: 0.45, anneal_until: 0.5,
     lambda: 0.0, threshold_lr: 1.0e-7, flops_controller: lambda_with_ceiling}
""")
    run_dir = run_recipe(recipe, progress=False)
    stuck = json.loads((run_dir / "stages" / "01-stuck" / "meta.json").read_text())["extra"]["calibration"]
    assert stuck["controller"] == "lambda" and stuck["reached_target_before_correction"] is False
    assert stuck["before"]["validation_relative_flops"] > 0.45 * 1.05
    assert any("did not reach the FLOPs target" in w for w in stuck["warnings"])
    assert stuck["correction_cost_points"] == pytest.approx(100 * (stuck["before"]["validation_main"] - stuck["validation_main_after"]))
    annealed = json.loads((run_dir / "stages" / "02-annealed" / "meta.json").read_text())["extra"]["calibration"]
    assert annealed["controller"] == "annealed_target" and annealed["reached_target_before_correction"] is True, annealed["before"]
    moves = annealed["schedule"]["moves"]
    assert moves and moves[-1]["schedule"] == pytest.approx(0.45) and moves[0]["schedule"] > moves[-1]["schedule"]
    from ltp_compress.stages.configs import LTPSoftStage

    assert LTPSoftStage(id="s", stage="ltp_soft").flops_controller == "lambda_with_bounds"  # the default
    # λ steering that cannot move (λ 0, thresholds all but frozen, as `stuck`) and the ceiling still
    # brings the FLOPs down to (here, with a 2-layer model's coarse steps, below) the target, only ever pruning more:
    # below the schedule it is λ's job to give tokens back
    ceiling = json.loads((run_dir / "stages" / "03-ceiling" / "meta.json").read_text())["extra"]["calibration"]
    assert ceiling["controller"] == "lambda_with_ceiling" and ceiling["before"]["validation_relative_flops"] <= 0.45 * 1.05
    assert all(m["offset"] >= 0 for m in ceiling["schedule"]["moves"]) and any(m["offset"] > 0 for m in ceiling["schedule"]["moves"])
    report = (run_dir / "report.md").read_text()
    assert "## End-of-stage FLOPs corrections" in report and "**WARNING** `stuck`: training did not reach" in report
    assert "**WARNING** `annealed`: training did not reach" not in report


def test_soft_stage_reports_and_lands_target_flops(tmp_path, tiny_bert):
    """`target_flops`: λ is steered during training (reported per epoch) and the final calibration
    puts validation relative FLOPs (the inputs it is fitted on) within ±target_tolerance of the target."""
    import json

    from ltp_compress.pipeline.runner import run_recipe

    recipe = _tiny_target_recipe(tmp_path, tiny_bert, 96, """\
  - {id: soft, stage: ltp_soft, epochs: 2, batch_size: 16, target_flops: 0.6, kd_teacher: ft}
  - {id: hard, stage: ltp_hard, epochs: 2, batch_size: 16, lr: 1.0e-3, target_flops: 0.5, retargets: 2, retarget_until: 0.9}
""")
    run_dir = run_recipe(recipe, progress=False)
    meta = json.loads((run_dir / "stages" / "01-soft" / "meta.json").read_text())
    extra = meta["extra"]
    target = extra["flops_target"]
    assert target["target_flops"] == 0.6 and target["convention"] == "executed" and target["calibration_inputs"] == "validation"
    # fitted on the validation inputs: lands there; dev is only reported
    assert abs(target["validation_relative_flops"] - 0.6) <= 0.05 * 0.6 and target["validation_within_tolerance"] is True
    assert target["dev_relative_flops"] == pytest.approx(meta["cost"]["relative_flops"])
    assert [h["epoch"] for h in extra["history"]] == [1, 2]
    assert all("validation_relative_flops" in h and "lambda" in h and "dev" not in h for h in extra["history"])
    assert extra["calibration"]["inputs"] == "validation"
    assert extra["calibration"]["relative_flops"] == pytest.approx(extra["validation_cost"]["relative_flops"])
    # ltp_hard re-fits the thresholds while finetuning (a large lr makes the drift real) and ends at its target
    hard = json.loads((run_dir / "stages" / "02-hard" / "meta.json").read_text())
    # 128 examples / 16 = 8 steps per epoch, 16 in all; 2 re-fits spread over the first 90% (14 steps)
    assert [r["step"] for r in hard["extra"]["retargets"]] == [7, 14]
    assert hard["extra"]["flops_target"]["validation_within_tolerance"] is True
    # keep_best picks among the evaluated checkpoints within the FLOPs tolerance, each with its own thresholds
    hist = hard["extra"]["history"]
    assert [h["step"] for h in hist] == [8, 16]
    ok = [h for h in hist if abs(h["validation_relative_flops"] - 0.5) <= 0.05 * 0.5]
    assert hard["extra"]["validation_cost"]["relative_flops"] in [pytest.approx(h["validation_relative_flops"]) for h in ok]
    assert hard["extra"]["pruning"]["thresholds"] != extra["pruning"]["thresholds"]


def test_baselines_land_a_flops_target_for_matched_comparisons(tmp_path, tiny_bert):
    """manual_prune / topk_prune with `target_flops` choose their one knob (θ_L, final keep ratio) on
    the validation inputs so every method runs at the same FLOPs level; an unreachable top-k target
    is an error naming the keys."""
    import json

    from ltp_compress.errors import UserError
    from ltp_compress.pipeline.runner import run_recipe

    from conftest import DEMO_DATA, write_recipe

    body = f"""\
model: {tiny_bert}
task: sst2
data: {{source: glue_dir, path: {DEMO_DATA}, max_train_examples: 96, max_dev_examples: 64, max_seq_length: 64}}
seed: 3
output_dir: {tmp_path / 'runs'}
num_threads: 1
stages:
  - {{id: ft, stage: finetune, epochs: 1, batch_size: 16, lr: 1.0e-3}}
"""
    recipe = write_recipe(tmp_path / "r.yaml", "name: base\n" + body + """\
  - {id: man, stage: manual_prune, init_from: ft, final_threshold: 0.1, epochs: 1, batch_size: 16, target_flops: 0.55, flops_convention: paper, retargets: 2}
  - {id: top, stage: topk_prune, init_from: ft, dense_layers: 1, epochs: 1, batch_size: 16, target_flops: 0.55, flops_convention: paper}
""")
    run_dir = run_recipe(recipe, progress=False)
    man = json.loads((run_dir / "stages" / "01-man" / "meta.json").read_text())["extra"]
    top = json.loads((run_dir / "stages" / "02-top" / "meta.json").read_text())["extra"]
    for extra in (man, top):
        t = extra["flops_target"]
        assert t["convention"] == "paper" and t["calibration_inputs"] == "validation"
        assert abs(t["validation_relative_flops"] - 0.55) <= 0.05 * 0.55, t
    th = man["pruning"]["thresholds"]
    assert th == pytest.approx([th[-1] * (l + 1) / len(th) for l in range(len(th))])  # still a linear ramp
    assert man["initial_fit"]["final_threshold"] != pytest.approx(0.1)  # moved from the recipe's value
    ratios = top["pruning"]["keep_ratios"]
    assert ratios[-1] == pytest.approx(top["initial_fit"]["final_keep_ratio"])
    bad = write_recipe(tmp_path / "bad.yaml", "name: bad\n" + body + """\
  - {id: top, stage: topk_prune, init_from: ft, dense_layers: 1, target_flops: 0.05}
""")
    # refused once the data is loaded, before the first stage (the finetune) runs
    with pytest.raises(UserError, match="stages\\[1\\].*target_flops 0.05 .* dense_layers 1"):
        run_recipe(bad, progress=False)
    assert not list((tmp_path / "runs" / "bad" / "stages").glob("*/meta.json"))


@pytest.mark.parametrize("dense_layers,ratio", [(0, 0.3), (1, 0.05), (2, 0.6)])
def test_topk_token_counts_follow_from_lengths_alone(tiny_bert, dense_layers, ratio):
    """The analytic top-k counts (used to fit final_keep_ratio and to check a target before any
    stage runs) equal the tokens the packed runtime keeps on real mixed-length batches."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ltp_compress.modeling.pruned_encoder import topk_tokens_per_layer

    from conftest import DEMO_DATA

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = [l.split("\t")[0] for l in (DEMO_DATA / "train.tsv").read_text().splitlines()[1:40]]
    enc = tok(texts, padding=True, return_tensors="pt")
    pruning = PruningConfig(mode="topk", keep_ratios=topk_keep_ratios(2, ratio, dense_layers))
    out = forward_packed(model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], pruning, return_kept=True)
    counts = topk_tokens_per_layer(enc["attention_mask"].sum(1).numpy(), pruning.keep_ratios)
    assert np.array_equal(counts, out.kept_tokens.numpy())
    assert counts[:, 1].sum() < counts[:, 0].sum()  # tokens really removed (2 layers: pruning after layer 0 in every case)
