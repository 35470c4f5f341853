"""Token-aware cost accounting (modeling/accounting.py): golden values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ltp_compress.modeling.accounting import (
    OP_CLASSES, EncoderShape, Precision, cost_summary, encoder_bops, encoder_flops, encoder_macs, last_layer_macs, layer_macs,
    relative_flops, tokens_leaving_layers,
)

SMALL = EncoderShape(num_layers=2, hidden=4, intermediate=8)


def test_layer_macs_small_shape_golden():
    # d=4, d_ff=8, n=3:
    #   qkv_proj     3·n·d·d    = 3·3·4·4 = 144
    #   attn_scores  n·n·d      = 3·3·4   = 36
    #   attn_context n·n·d      = 36
    #   out_proj     n·d·d      = 3·4·4   = 48
    #   ffn          2·n·d·d_ff = 2·3·4·8 = 192
    #   total                              = 456
    m = layer_macs(3, 4, 8)
    assert set(m) == set(OP_CLASSES)
    assert {k: float(v) for k, v in m.items()} == {
        "qkv_proj": 144.0, "attn_scores": 36.0, "attn_context": 36.0, "out_proj": 48.0, "ffn": 192.0,
    }
    assert float(sum(m.values())) == 456.0
    # vectorised over examples: n=1 -> 3·16 + 4 + 4 + 16 + 64 = 136
    mv = layer_macs(np.array([3, 1]), 4, 8)
    assert float(sum(mv.values())[0]) == 456.0 and float(sum(mv.values())[1]) == 136.0


def test_encoder_macs_and_flops_small_shape_golden():
    # L=2: [3, 3] tokens -> 2·456 = 912 MACs = 1824 FLOPs;
    #      [3, 1] tokens: layer 0 has 3 tokens in attention but only the 1 survivor goes through
    #      its output projection and FFN: 144 + 36 + 36 + 1·16 + 2·1·4·8 = 296; layer 1 (n=1) = 136;
    #      total 432 MACs = 864 FLOPs
    tokens = np.array([[3, 3], [3, 1]])
    assert encoder_macs(tokens, SMALL).tolist() == [912.0, 432.0]
    assert encoder_flops(tokens, SMALL).tolist() == [1824.0, 864.0]


def test_layer_macs_with_tokens_pruned_after_attention_golden():
    # d=4, d_ff=8, 3 tokens enter, 1 leaves: qkv 3·3·16 = 144, scores 9·4 = 36, context 36,
    # out_proj 1·16 = 16, ffn 2·1·4·8 = 64
    m = layer_macs(3, 4, 8, n_out=1)
    assert {k: float(v) for k, v in m.items()} == {
        "qkv_proj": 144.0, "attn_scores": 36.0, "attn_context": 36.0, "out_proj": 16.0, "ffn": 64.0,
    }
    # the last layer prunes nothing: its output rows are the tokens entering it
    assert tokens_leaving_layers(np.array([[5, 3, 2]])).tolist() == [[3.0, 2.0, 2.0]]


def test_bert_base_golden():
    shape = EncoderShape(num_layers=12, hidden=768, intermediate=3072)
    # one token: 3·768² + 2·768 (n²d, n=1) + 768² + 2·768·3072 = 1769472 + 1536 + 589824 + 4718592 = 7079424
    assert float(sum(layer_macs(1, 768, 3072).values())) == 7_079_424.0
    # n=128, per layer: 3·128·768² = 226492416; 2·128²·768 = 25165824; 128·768² = 75497472;
    # 2·128·768·3072 = 603979776; sum = 931135488; x12 layers = 11173625856 MACs = 22347251712 FLOPs
    assert float(sum(layer_macs(128, 768, 3072).values())) == 931_135_488.0
    tokens = np.full((1, 12), 128)
    assert encoder_macs(tokens, shape).tolist() == [11_173_625_856.0]
    assert encoder_flops(tokens, shape).tolist() == [22_347_251_712.0]


def test_encoder_shape_from_config():
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=48, num_hidden_layers=3, intermediate_size=96, num_attention_heads=4)
    assert EncoderShape.from_config(cfg) == EncoderShape(3, 48, 96)


def test_relative_flops_of_half_pruned_schedule():
    # d=4, d_ff=8, n=4 -> layer(4) = 192 + 64 + 64 + 64 + 256 = 640 MACs;
    #            n=2 -> layer(2) =  96 + 16 + 16 + 32 + 128 = 288 MACs.
    # layer 0 with 4 in, 2 out: 192 + 64 + 64 + 2·16 + 2·2·4·8 = 480 MACs.
    # tokens [4, 2] vs dense [4, 4]: (480 + 288) / (640 + 640) = 768 / 1280 = 0.6
    pruned = encoder_flops(np.array([[4, 2]]), SMALL)
    dense = encoder_flops(np.array([[4, 4]]), SMALL)
    assert float(pruned[0] / dense[0]) == pytest.approx(0.6, abs=1e-15)


def test_bops_int8_dense_is_quarter_of_fp16():
    tokens = np.array([[5, 5], [3, 3]])
    int8 = encoder_bops(tokens, SMALL, Precision.uniform(8, 8))
    fp16 = encoder_bops(tokens, SMALL, Precision.uniform(16, 16))
    fp32 = encoder_bops(tokens, SMALL, Precision.uniform(32, 32))
    assert float(int8.sum() / fp16.sum()) == 0.25
    assert float(int8.sum() / fp32.sum()) == 0.0625
    # BOPs = MACs · b_w · b_a
    assert (fp32 == encoder_macs(tokens, SMALL) * 1024).all()


def test_bops_int8_linear_fp32_attention_golden():
    # one layer, d=4, d_ff=8, n=3: Linear MACs 144 + 48 + 192 = 384 at 8x8 bits, attention
    # matmuls 36 + 36 = 72 at 32x32 bits -> 384·64 + 72·1024 = 24576 + 73728 = 98304 BOPs.
    # FP16 dense: 456·256 = 116736 -> ratio 98304 / 116736 = 16/19.
    shape = EncoderShape(1, 4, 8)
    bops = encoder_bops(np.array([[3]]), shape, Precision.int8_linear_fp_attention())
    assert bops.tolist() == [98304.0]
    s = cost_summary(np.array([[3]]), np.array([3]), shape, Precision.int8_linear_fp_attention())
    assert s["relative_bops_vs_fp16_dense"] == pytest.approx(16 / 19, rel=1e-15)
    assert s["relative_bops_vs_fp32_dense"] == pytest.approx(98304 / (456 * 1024), rel=1e-15)
    assert Precision.int8_linear_fp_attention(16).bits["attn_scores"] == (16, 16)
    assert Precision.int8_linear_fp_attention().bits["ffn"] == (8, 8)


def test_cost_summary_fields_golden():
    # two examples, lengths 4 and 2; tokens entering layers: [4, 2] and [2, 2]
    # MACs: ex0 480 + 288 = 768 (layer 0: 4 tokens in, 2 out), ex1 288 + 288 = 576;
    # dense ex0 1280, ex1 576. FLOPs: 1536, 1152 (dense 2560, 1152)
    # relative_flops = ratio of sums = 2688 / 3712 (NOT the mean of ratios (0.6 + 1) / 2)
    tokens = np.array([[4, 2], [2, 2]])
    lengths = np.array([4, 2])
    s = cost_summary(tokens, lengths, SMALL, Precision.uniform(32, 32))
    assert s["gflops_per_example"] == pytest.approx((1536 + 1152) / 2 / 1e9, rel=1e-12)
    assert s["dense_gflops_per_example"] == pytest.approx((2560 + 1152) / 2 / 1e9, rel=1e-12)
    assert s["relative_flops"] == pytest.approx(2688 / 3712, rel=1e-12)
    assert s["gbops_per_example"] == pytest.approx((1536 + 1152) / 2 * 1024 / 2 / 1e9, rel=1e-12)  # MACs·32·32
    # FP32 precision: BOPs vs FP32 dense = relative FLOPs; vs FP16 dense = 4x that
    assert s["relative_bops_vs_fp32_dense"] == pytest.approx(2688 / 3712, rel=1e-12)
    assert s["relative_bops_vs_fp16_dense"] == pytest.approx(4 * 2688 / 3712, rel=1e-12)
    assert s["mean_tokens_per_layer"] == [3.0, 2.0]
    assert s["mean_keep_fraction_per_layer"] == [1.0, 0.75]  # ex0 [1, .5], ex1 [1, 1]
    q = s["keep_fraction_quantiles_per_layer"]
    assert set(q) == {"0.1", "0.5", "0.9"}
    assert q["0.5"] == pytest.approx([1.0, 0.75])
    assert q["0.1"] == pytest.approx([1.0, 0.55])  # linear interpolation between 0.5 and 1
    assert q["0.9"] == pytest.approx([1.0, 0.95])
    assert s["mean_input_tokens"] == 3.0
    # JSON-serialisable plain floats
    import json

    json.dumps(s)


def test_cost_summary_dense_is_one():
    tokens = np.array([[7, 7], [3, 3], [10, 10]])
    s = cost_summary(tokens, np.array([7, 3, 10]), SMALL, Precision.uniform(8, 8))
    assert s["relative_flops"] == 1.0
    assert s["relative_bops_vs_fp16_dense"] == 0.25
    assert s["mean_keep_fraction_per_layer"] == [1.0, 1.0]
    assert s["gflops_per_example"] == s["dense_gflops_per_example"]


def test_paper_convention_charges_out_proj_at_tokens_entering_golden():
    # d=4, d_ff=8, 3 tokens enter, 1 leaves. The official LTP bookkeeping charges Q, K, V and the
    # output projection at the 3 tokens entering and only the FFN at the 1 kept:
    #   qkv 144, scores 36, context 36, out_proj 3·16 = 48, ffn 64 -> 328 (executed: 296)
    m = layer_macs(3, 4, 8, n_out=1, convention="paper")
    assert {k: float(v) for k, v in m.items()} == {
        "qkv_proj": 144.0, "attn_scores": 36.0, "attn_context": 36.0, "out_proj": 48.0, "ffn": 64.0,
    }
    # [3, 1] tokens (L=2): layer 0 = 328, layer 1 (n=1, nothing pruned) = 136 -> 464 MACs (executed 432)
    tokens = np.array([[3, 3], [3, 1]])
    assert encoder_macs(tokens, SMALL, "paper").tolist() == [912.0, 464.0]
    # dense inputs: both conventions agree
    assert encoder_macs(np.array([[3, 3]]), SMALL, "paper").tolist() == encoder_macs(np.array([[3, 3]]), SMALL).tolist()
    with pytest.raises(ValueError, match="convention"):
        layer_macs(3, 4, 8, convention="official")


def test_cost_summary_reports_both_conventions_golden():
    # one example of 3 tokens, [3, 1] entering: executed 432 / 912, paper 464 / 912 relative MACs
    cost = cost_summary(np.array([[3, 1]]), np.array([3]), SMALL, Precision.uniform(8, 8))
    assert cost["by_convention"]["executed"]["relative_flops"] == pytest.approx(432 / 912)
    assert cost["by_convention"]["paper"]["relative_flops"] == pytest.approx(464 / 912)
    assert cost["relative_flops"] == cost["by_convention"]["executed"]["relative_flops"]  # top level = executed
    # BOPs likewise: 8x8 bits everywhere vs FP16 dense = (464·64) / (912·256)
    assert cost["by_convention"]["paper"]["relative_bops_vs_fp16_dense"] == pytest.approx(464 * 64 / (912 * 256))


def test_last_layer_on_cls_only_golden():
    # d=4, d_ff=8, L=2 (SMALL), last layer run on its [CLS] row only past QKV (the fused runtime):
    # 3 tokens enter it: qkv 3·3·16 = 144, scores 1·3·4 = 12, context 12, out_proj 16, ffn 2·4·8 = 64 -> 248
    assert {k: float(v) for k, v in last_layer_macs(3, 4, 8).items()} == {
        "qkv_proj": 144.0, "attn_scores": 12.0, "attn_context": 12.0, "out_proj": 16.0, "ffn": 64.0}
    # tokens [3, 3]: layer 0 as always (456), layer 1 248 -> 704; [3, 1]: 296 + (48 + 4 + 4 + 16 + 64 = 136) = 432
    tokens = np.array([[3, 3], [3, 1]])
    assert encoder_macs(tokens, SMALL, last_layer_rows="cls").tolist() == [704.0, 432.0]
    # relative FLOPs: both counts the same way; [3, 1] vs dense [3, 3]: 432 / 704
    assert relative_flops(tokens[1:], np.array([3]), SMALL, last_layer_rows="cls") == pytest.approx(432 / 704)
    assert relative_flops(tokens[1:], np.array([3]), SMALL) == pytest.approx(432 / 912)
    with pytest.raises(ValueError, match="last_layer_rows"):
        encoder_macs(tokens, SMALL, last_layer_rows="first")
