"""Static INT8 quantisation (modeling/quantized.py): quantiser round trip, observers, INT8 model vs
its fake-quant reference, token removal + kernel counters on the INT8 model, fallback stage.

Bound used for INT8 vs fake-quant: both use identical integer grids (same activation scales, same
per-channel int8 weights); only the accumulation differs (exact int32 then one fp32 scaling vs an
fp32 matmul of dequantised values). Per Linear that is <= 1e-5 relative; through the whole model a
rare rounding-boundary flip of one activation code may propagate, so logits must agree within
1e-3 · max|logit| + 1e-5 (observed: ~1e-8 on the tiny models).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltp_compress.kernels import KERNEL_COUNTER, Int8Linear, kernel_counters, quantize_per_channel_symmetric, reset_kernel_counters
from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_masked, forward_packed
from ltp_compress.modeling.quantized import (
    FakeQuantLinear, MinMaxObserver, PercentileObserver, QATLinear, calibrate, convert_to_int8,
    disable_qat, enable_qat, fake_quant_model, linear_names,
)

from conftest import DEMO_DATA



class _B:
    def __init__(self, enc):
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]
        self.token_type_ids = enc.get("token_type_ids")


def _load(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _batches(tok, n=2, bs=16, offset=0):
    lines = (DEMO_DATA / "train.tsv").read_text().splitlines()[1 + offset:]
    texts = [l.split("\t")[0] for l in lines[: n * bs]]
    return [_B(tok(texts[i:i + bs], padding=True, return_tensors="pt")) for i in range(0, len(texts), bs)]


# ----------------------------------------------------------------------------- quantisers


def test_per_channel_roundtrip_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # channels of very different range
    w[5] = 0.0
    w_q, s = quantize_per_channel_symmetric(w)
    assert w_q.dtype == torch.int8 and int(w_q.abs().max()) <= 127
    torch.testing.assert_close(s[:4], w[:4].abs().amax(1) / 127)
    err = (w - w_q.float() * s[:, None]).abs()
    assert torch.all(err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12)  # |w - ŵ| <= scale/2 per channel
    assert torch.all(w_q[5] == 0)
    # per-channel beats per-tensor on channels of small range
    t_scale = w.abs().max() / 127
    err_t = (w - torch.round(w / t_scale).clamp(-127, 127) * t_scale).abs()
    assert err[:10].max() < err_t[:10].max()


def test_minmax_observer_gives_max_abs_over_127():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([[0.5, -3.0], [1.0, 2.0]]))
    obs.observe(torch.tensor([2.5, -0.1]))
    assert obs.scale() == pytest.approx(3.0 / 127)
    # agrees with torch.ao's symmetric MinMaxObserver on the [-127, 127] range
    from torch.ao.quantization.observer import MinMaxObserver as AoMinMax

    ao = AoMinMax(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    ao(torch.tensor([[0.5, -3.0], [1.0, 2.0]]))
    ao(torch.tensor([2.5, -0.1]))
    assert float(ao.calculate_qparams()[0]) == pytest.approx(obs.scale(), rel=1e-6)


def test_percentile_observer_on_known_distribution():
    g = torch.Generator().manual_seed(1)
    obs = PercentileObserver(99.0, sample_per_call=1 << 20)
    for _ in range(4):
        obs.observe(torch.rand(50_000, generator=g) * 2 - 1)  # |x| ~ U(0, 1): 99th pct = 0.99
    assert obs.amax() == pytest.approx(0.99, abs=0.005)
    obs.observe(torch.tensor([1000.0]))  # one outlier: min-max explodes, percentile does not
    assert obs.amax() == pytest.approx(0.99, abs=0.005) and obs.max_abs == 1000.0
    assert obs.scale() == pytest.approx(obs.amax() / 127)
    # Gaussian: 99.9th percentile of |N(0,1)| = 3.2905; subsampled (bounded memory) still close
    obs = PercentileObserver(99.9, sample_per_call=1 << 16)
    for _ in range(8):
        obs.observe(torch.randn(200_000, generator=g))
    assert obs.amax() == pytest.approx(3.2905, abs=0.08)


# ----------------------------------------------------------------------------- model conversion


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return _load(tiny_bert)


def test_calibration_uses_pruned_runtime_and_covers_every_linear(bert):
    model, tok = bert
    batches = _batches(tok)
    dense = calibrate(model, batches, PruningConfig())
    pruned = calibrate(model, batches, PruningConfig(mode="threshold", thresholds=[1.05, 1.05]))
    assert set(dense) == set(linear_names(model)) and len(dense) == 2 * 6 + 2
    # layer 0 sees the same tokens; layer 1 sees only the kept ones (range can only shrink)
    assert pruned["bert.encoder.layer.0.attention.self.query"] == dense["bert.encoder.layer.0.attention.self.query"]
    assert pruned["bert.encoder.layer.1.intermediate.dense"] <= dense["bert.encoder.layer.1.intermediate.dense"] + 1e-12


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_int8_model_matches_fake_quant_reference(tiny_bert, tiny_roberta, model_type):
    model, tok = _load(tiny_bert if model_type == "bert" else tiny_roberta)
    pruning = PruningConfig(mode="threshold", thresholds=[1.0, 1.0])
    scales = calibrate(model, _batches(tok), pruning)
    qmodel, info = convert_to_int8(model, scales, "auto")
    assert all(isinstance(qmodel.get_submodule(n), Int8Linear) for n in linear_names(model))
    ref = fake_quant_model(model, scales, info.weight_qmax)
    assert all(isinstance(ref.get_submodule(n), FakeQuantLinear) for n in linear_names(model))
    b = _batches(tok, n=1, offset=200)[0]
    yq = forward_packed(qmodel, b.input_ids, b.attention_mask, b.token_type_ids, pruning).logits
    yr = forward_packed(ref, b.input_ids, b.attention_mask, b.token_type_ids, pruning).logits
    yf = forward_packed(model, b.input_ids, b.attention_mask, b.token_type_ids, pruning).logits
    bound = 1e-3 * float(yr.abs().max()) + 1e-5
    assert float((yq - yr).abs().max()) <= bound
    # and quantisation really changed something vs FP32 (the test is not vacuous)
    assert float((yq - yf).abs().max()) > float((yq - yr).abs().max())
    # per layer: one Int8Linear vs FakeQuantLinear on the same input
    lin = model.get_submodule(linear_names(model)[0])
    x = torch.randn(7, lin.in_features)
    s = float(x.abs().max()) / 127
    a = Int8Linear.from_float(lin, s, backend=info.backend)(x)
    r = FakeQuantLinear(lin, s, info.weight_qmax)(x)
    assert float((a - r).abs().max()) <= 1e-5 * float(r.abs().max()) + 1e-6


def test_int8_model_removes_tokens_and_runs_int8_kernel(bert):
    model, tok = bert
    pruning = PruningConfig(mode="threshold", thresholds=[1.0, 1.0])
    qmodel, info = convert_to_int8(model, calibrate(model, _batches(tok), pruning), "auto")
    b = _batches(tok, n=1, offset=300)[0]
    reset_kernel_counters()
    out = forward_packed(qmodel, b.input_ids, b.attention_mask, b.token_type_ids, pruning, return_kept=True)
    lengths = b.attention_mask.sum(1)
    assert torch.equal(out.kept_tokens[:, 0], lengths)
    assert int(out.kept_tokens[:, 1].sum()) < int(lengths.sum())  # tokens really removed after layer 0
    counters = kernel_counters()
    assert counters.get(KERNEL_COUNTER[info.backend], 0) == 14  # 2 layers x 6 Linear + pooler + classifier
    if info.backend != "reference":
        assert "reference" not in counters  # no silent fallback
    # the hard-masked path (training reference) through the same INT8 modules agrees
    m = forward_masked(qmodel, b.input_ids, b.attention_mask, b.token_type_ids, mode="hard",
                       thresholds=torch.tensor(pruning.thresholds))
    assert torch.equal(m.kept_tokens, out.kept_tokens)


def test_explicit_reference_backend_and_gelu_fusion(bert):
    model, tok = bert
    scales = calibrate(model, _batches(tok, n=1), PruningConfig())
    q1, i1 = convert_to_int8(model, scales, "reference", fuse_gelu=False)
    q2, i2 = convert_to_int8(model, scales, "reference", fuse_gelu=True)
    assert i1.backend == "reference" and i1.fused_gelu == [] and len(i2.fused_gelu) == 2
    assert isinstance(q2.bert.encoder.layer[0].intermediate.intermediate_act_fn, nn.Identity)
    b = _batches(tok, n=1, offset=100)[0]
    reset_kernel_counters()
    y1 = forward_packed(q1, b.input_ids, b.attention_mask, b.token_type_ids, PruningConfig()).logits
    y2 = forward_packed(q2, b.input_ids, b.attention_mask, b.token_type_ids, PruningConfig()).logits
    assert set(kernel_counters()) == {"reference"}
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-6)
    with pytest.raises(KeyError):
        convert_to_int8(model, {}, "reference")


def test_qat_linear_fake_quantises_with_ste_and_restores(bert):
    model, _ = bert
    import copy

    m = copy.deepcopy(model)
    names = enable_qat(m)
    lin = m.get_submodule(names[0])
    assert isinstance(lin, QATLinear)
    keys_before = set(model.state_dict())
    assert set(m.state_dict()) == keys_before
    m.train()
    x = torch.randn(5, lin.in_features, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad is not None  # STE: gradients flow through rounding
    plain = nn.Linear(lin.in_features, lin.out_features)
    plain.load_state_dict({"weight": lin.weight.detach(), "bias": lin.bias.detach()})
    ref = FakeQuantLinear(plain, float(x.detach().abs().max()) / 127)
    torch.testing.assert_close(y.detach(), ref(x.detach()), rtol=1e-5, atol=1e-6)
    scales = disable_qat(m)
    assert type(m.get_submodule(names[0])) is nn.Linear and names[0] in scales
    assert scales[names[0]] == pytest.approx(float(x.detach().abs().max()) / 127)


# ----------------------------------------------------------------------------- the stage


@pytest.mark.parametrize("variant", ["fallback", "qat_scales"])
def test_quantize_stage(tmp_path, variant, monkeypatch):
    import json

    from conftest import build_tiny_model
    from test_distill import _context

    from ltp_compress.modeling.deploy import load_deployable
    from ltp_compress.stages import quantize

    teacher = build_tiny_model(tmp_path / "teacher", seed=1)
    student = build_tiny_model(tmp_path / "student", seed=2)
    (student / "pruning.json").write_text(json.dumps({"mode": "threshold", "thresholds": [1.0, 1.0], "keep_ratios": None}))
    if variant == "fallback":
        stage = "{id: q, stage: quantize, calibration_batches: 2, calibration_batch_size: 16, max_accuracy_drop: 0.0, max_fallback_layers: 2, backend: reference}"
    else:
        model, _ = _load(student)
        (student / "act_scales.json").write_text(json.dumps({"act_scales": {n: 0.05 for n in linear_names(model)}}))
        stage = "{id: q, stage: quantize, reuse_qat_scales: true, backend: reference}"
    cfg, ctx = _context(tmp_path, student, teacher, stage)
    if variant == "fallback":  # force a large INT8 drop so the greedy loop must keep layers in FP
        calls = []
        monkeypatch.setattr(quantize, "validation_main", lambda *a, **k: 1.0 if not calls.append(1) and len(calls) == 1 else 0.0)
    res = quantize.run(cfg, ctx)
    assert res.extra["kernel"]["backend"] == "reference" and res.extra["kernel"]["counters"]["reference"] > 0
    assert res.cost["precision"]["attn_scores"] == (32, 32)
    dm = load_deployable(ctx.out_dir / "model", backend="reference")
    if variant == "fallback":
        fb = res.extra["fallback"]
        assert len(fb["trials"]) == 3 and len(res.extra["fp_layers"]) == 2 and not fb["met_budget"]
        ranked = sorted(fb["sensitivity"], key=fb["sensitivity"].get, reverse=True)
        assert res.extra["fp_layers"] == ranked[:2]  # the most sensitive layers stay float
        assert res.extra["int8_layers"] + len(res.extra["fp_layers"]) == 14
        for n in res.extra["fp_layers"]:
            assert type(dm.model.get_submodule(n)) is nn.Linear  # kept float in the checkpoint too
    else:
        assert res.extra["act_scale_source"].endswith("act_scales.json")
        assert dm.ltp.quantization.act_scales is None  # stored once: the x_scale tensors
        assert all(float(m.x_scale) == pytest.approx(0.05) for m in dm.model.modules() if isinstance(m, Int8Linear))
    assert len(dm.predict(["a fine film", "dull"])) == 2


@pytest.mark.parametrize("convention", ["executed", "paper"])
def test_quantize_refits_thresholds_to_target_on_the_int8_model(tmp_path, convention):
    """`target_flops` on quantize: the thresholds are moved on the INT8 model so the deployed model
    runs at the target (validation inputs; in the stage's convention), and the checkpoint keeps them."""
    import json

    from conftest import build_tiny_model
    from test_distill import _context

    from ltp_compress.modeling.deploy import load_deployable
    from ltp_compress.stages import quantize

    teacher = build_tiny_model(tmp_path / "teacher", seed=1)
    student = build_tiny_model(tmp_path / "student", seed=2)
    (student / "pruning.json").write_text(json.dumps({"mode": "threshold", "thresholds": [0.2, 0.4], "keep_ratios": None}))
    stage = ("{id: q, stage: quantize, calibration_batches: 2, calibration_batch_size: 16, "
             f"target_flops: 0.7, flops_convention: {convention}, target_tolerance: 0.05}}")
    cfg, ctx = _context(tmp_path, student, teacher, stage)
    res = quantize.run(cfg, ctx)
    refit, target = res.extra["refit"], res.extra["flops_target"]
    assert refit["before"] > 0.9 and refit["convention"] == convention  # thresholds 0.2/0.4 prune almost nothing
    assert target["validation_within_tolerance"] is True
    val = res.extra["validation_cost"]["by_convention"][convention]["relative_flops"]
    assert abs(val - 0.7) <= 0.05 * 0.7 and val == pytest.approx(target["validation_relative_flops"])
    dm = load_deployable(ctx.out_dir / "model", backend="reference")
    assert dm.pruning.thresholds == res.extra["pruning"]["thresholds"] != [0.2, 0.4]


def test_quantize_stage_device_follows_the_backend(monkeypatch):
    """The 'cuda' backend calibrates and evaluates on the GPU (the H200 check found the stage left
    the model on the CPU); every CPU backend, 'auto' included, stays on the CPU."""
    import torch

    from ltp_compress.stages.quantize import quantize_device

    for b in ("auto", "reference", "cpu_vnni", "cpu_avx2", "cpu_int_mm"):
        assert quantize_device(b) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        quantize_device("cuda")


def test_activation_quantiser_divides_exactly_with_tensor_or_float_scale():
    """quantize_per_tensor_symmetric gives the same codes for a float scale and a 0-dim fp32 tensor
    scale (the form it uses on CUDA, where a CPU-scalar divisor becomes a reciprocal multiply), on
    values placed exactly at .5 boundaries, where x * (1/s) and x / s round differently."""
    import torch

    from ltp_compress.kernels.linear_int8 import quantize_per_tensor_symmetric

    s = 0.037
    g = torch.Generator().manual_seed(0)
    x = ((torch.randint(-126, 126, (4096,), generator=g).float() + 0.5) * torch.tensor(s)).float()
    a = quantize_per_tensor_symmetric(x, s)
    b = quantize_per_tensor_symmetric(x, torch.tensor(s, dtype=torch.float32))
    assert torch.equal(a, b)
    exact = torch.round(x.double() / torch.tensor(s, dtype=torch.float32).double()).clamp(-127, 127)  # the fp32 division, rounded
    recip = torch.round(x * (1.0 / torch.tensor(s, dtype=torch.float32))).clamp(-127, 127)
    assert torch.equal(a.double(), torch.round((x / torch.tensor(s)).double()).clamp(-127, 127))
    assert not torch.equal(recip.double(), exact)  # the reciprocal form really differs on these inputs (negative control)


# ----------------------------------------------------------------------------- INT8 attention matmuls


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_int8_attention_model_runs_both_matmuls_on_int8_grids(tiny_bert, tiny_roberta, model_type):
    """Q/K/V scales cover every layer (observed on the pruned runtime); the INT8-attention model
    runs both matmuls per layer on the integer grids, keeps the same tokens on the packed and the
    masked path, and stays close to the FP32-attention INT8 model without equalling it."""
    from ltp_compress.modeling.quantized import attach_int8_attention, attention_names, calibrate_attention

    model, tok = _load(tiny_bert if model_type == "bert" else tiny_roberta)
    pruning = PruningConfig(mode="threshold", thresholds=[1.0, 1.0])
    batches = _batches(tok)
    att = calibrate_attention(model, batches, pruning)
    assert sorted(att) == attention_names(model) and len(att) == 2
    for name, sc in att.items():  # scale = max |projection output| / 127 on the calibration tokens
        assert set(sc) == {"q", "k", "v"} and all(v > 0 for v in sc.values())
    qmodel, _ = convert_to_int8(model, calibrate(model, batches, pruning), "auto")
    fp_att = forward_packed(qmodel, *_args(_batches(tok, n=1, offset=200)[0]), pruning, return_kept=True)
    attach_int8_attention(qmodel, att)
    b = _batches(tok, n=1, offset=200)[0]
    reset_kernel_counters()
    out = forward_packed(qmodel, *_args(b), pruning, return_kept=True)
    assert kernel_counters()["attention_int8_fp32_exact"] == 2 * 2  # Q·Kᵀ and P·V in each of 2 layers
    m = forward_masked(qmodel, *_args(b), mode="hard", thresholds=torch.tensor(pruning.thresholds))
    assert torch.equal(m.kept_tokens, out.kept_tokens)
    torch.testing.assert_close(m.logits, out.logits, rtol=1e-3, atol=1e-3 * float(out.logits.abs().max()))
    diff = float((out.logits - fp_att.logits).abs().max())
    assert 0 < diff <= 0.05 * float(fp_att.logits.abs().max()) + 1e-3


def _args(b):
    return b.input_ids, b.attention_mask, b.token_type_ids


def test_quantize_stage_with_int8_attention_charges_8_bits_and_round_trips(tmp_path):
    """attention_matmuls: int8 -> BOPs charge Q·Kᵀ and P·V at 8x8 (fewer BOPs than the FP32-attention
    stage), the checkpoint stores the scales and loads into the same model
    (same logits); tests/test_onnx_export.py exports it."""
    import json

    from conftest import build_tiny_model
    from test_distill import _context

    from ltp_compress.modeling.deploy import load_deployable
    from ltp_compress.stages import quantize

    teacher = build_tiny_model(tmp_path / "teacher", seed=1)
    student = build_tiny_model(tmp_path / "student", seed=2)
    (student / "pruning.json").write_text(json.dumps({"mode": "threshold", "thresholds": [1.0, 1.0], "keep_ratios": None}))
    results = {}
    for att in ("fp32", "int8"):
        stage = f"{{id: q, stage: quantize, calibration_batches: 2, calibration_batch_size: 16, attention_matmuls: {att}}}"
        (tmp_path / att).mkdir()
        cfg, ctx = _context(tmp_path / att, student, teacher, stage)
        results[att] = (quantize.run(cfg, ctx), ctx)
    (r32, _), (r8, ctx8) = results["fp32"], results["int8"]
    assert r8.cost["precision"]["attn_scores"] == (8, 8) and r8.cost["precision"]["attn_context"] == (8, 8)
    assert r32.cost["precision"]["attn_scores"] == (32, 32) and r8.extra["attention_matmuls"] == "int8"
    # (kept tokens may differ a little: the scores come from probabilities of the quantised Q·Kᵀ)
    for conv in ("executed", "paper"):
        assert r8.cost["by_convention"][conv]["relative_bops_vs_fp16_dense"] < r32.cost["by_convention"][conv]["relative_bops_vs_fp16_dense"]
    assert r8.extra["kernel"]["counters"]["attention_int8_fp32_exact"] > 0
    assert "attention_int8_fp32_exact" not in r32.extra["kernel"]["counters"]
    dm = load_deployable(ctx8.out_dir / "model")
    q = dm.ltp.quantization
    assert q.attention_matmuls == "int8" and len(q.attention_scales) == 2
    for name, sc in q.attention_scales.items():
        mod = dm.model.get_submodule(name).int8_matmuls
        assert (float(mod.q_scale), float(mod.k_scale), float(mod.v_scale)) == pytest.approx((sc["q"], sc["k"], sc["v"]), rel=1e-6)
    reset_kernel_counters()
    dm.predict(["a fine film", "dull"])
    assert kernel_counters()["attention_int8_fp32_exact"] == 4
