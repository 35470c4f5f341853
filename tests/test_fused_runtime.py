"""Fused C++ runtime (kernels/fused/, kernels/fused_encoder.py, modeling/fused_runtime.py) against
the reference torch runtime (modeling/deploy.py, `forward_packed`).

Kernel level: the avx512_vnni GEMM and the C++ reference GEMM give the same int32 accumulators as
the plain-torch `int8_linear_reference` (outputs within float32 epilogue rounding); the extension's
activation quantiser is bit-equal to kernels/linear_int8.py's; its vector erf-GELU is within 1e-6
of float64 erf-GELU (Abramowitz & Stegun 7.1.26, |erf error| <= 1.5e-7), its vector tanh within 2e-7 of
torch's.

Model level, tiny BERT / RoBERTa deployable checkpoints (conftest), bs 1 and a bs-7 batch of mixed
lengths: kept tokens per example and layer equal the reference's; logits within rtol 1e-3,
atol 1e-5 (logits here are ~1e-2). Why not bit-equal: the integer GEMMs are exact in both
runtimes, but LayerNorm, softmax, GELU and reductions are float code that rounds differently in
the last bits, and such a difference can move an activation across a rounding boundary of the
next quantiser (one int8 step, ~x_scale * |w| downstream); the same tolerance as the ONNX export's
tests. Thresholds are chosen in the middle of a wide gap of the reference's layer-0 scores, away
from ties (a score differs by ~1e-7 between the runtimes).

The onednn_brgemm kernel (oneDNN's brgemm ukernel through torch; AMX tiles where the CPU has
them) gives outputs bit-equal to avx512_vnni's: the same exact int32 sums and the same epilogue
arithmetic; whole models through it match the reference runtime as above.

Every test skips, with the reason, when the extension cannot be built here (no compiler, no
ninja), the avx512_vnni tests when the CPU lacks AVX-512 VNNI, and the onednn_brgemm tests when
torch's oneDNN refuses u8 x s8 brgemm here (the reason is its error).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ltp_compress
from ltp_compress.kernels import fused_encoder
from ltp_compress.modeling.deploy import load_deployable, save_deployable
from ltp_compress.modeling.pruned_encoder import PruningConfig

from conftest import build_tiny_model
from test_onnx_export import _calibration_batches, _dev_texts
from test_onnx_export import _mixed_batch as _mixed_texts

RTOL, ATOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def ext():
    reason = fused_encoder.available()
    if reason is not None:
        pytest.skip(f"fused encoder extension unavailable: {reason}")
    return fused_encoder.build()


@pytest.fixture(scope="module")
def vnni(ext):
    reason = fused_encoder.gemm_kernel_unavailable_reason("avx512_vnni")
    if reason is not None:
        pytest.skip(f"avx512_vnni kernel unavailable: {reason}")
    return "avx512_vnni"


@pytest.fixture(scope="module")
def brgemm(ext, vnni):
    reason = fused_encoder.gemm_kernel_unavailable_reason("onednn_brgemm")
    if reason is not None:
        pytest.skip(f"onednn_brgemm kernel unavailable: {reason}")
    return "onednn_brgemm"


# ----------------------------------------------------------------------------- kernels


# 150: several row blocks; 49 / 97: just over one / two blocks of 48 (the rows spread evenly over a
# multiple of the threads' count of blocks, with uneven tails); 8-11: tails of 2-5 rows on full
# 64-channel panels (the assembly tiles)
@pytest.mark.parametrize("shape", [(1, 32, 2), (7, 33, 70), (25, 32, 96), (13, 130, 200), (6, 64, 64), (150, 64, 200),
                                   (49, 128, 256), (97, 64, 192), (8, 64, 128), (9, 36, 128), (10, 64, 192), (11, 4, 64)])
@pytest.mark.parametrize("act_qmin", [-128, -127])
@pytest.mark.parametrize("gelu", [False, True])
def test_gemm_kernels_match_torch_reference(ext, vnni, shape, act_qmin, gelu):
    from ltp_compress.kernels import int8_linear_reference, quantize_per_channel_symmetric, quantize_per_tensor_symmetric

    m, k, n = shape
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w_q, w_scale = quantize_per_channel_symmetric(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    x_scale = 0.02  # |x| / x_scale reaches past 127 and -128: both clamps are exercised
    expected = int8_linear_reference(quantize_per_tensor_symmetric(x, x_scale, act_qmin), x_scale, w_q, w_scale, bias, gelu)
    got = {kern: ext.Int8Weight(w_q, w_scale, bias, x_scale, act_qmin, gelu, kern).linear(x) for kern in ("avx512_vnni", "reference")}
    for kern, y in got.items():
        # exact int32 accumulators; the float32 epilogue (one product scale, then bias) vs float64 in the reference
        torch.testing.assert_close(y, expected, rtol=2e-6, atol=2e-6 * float(expected.abs().max()), msg=kern)
    torch.testing.assert_close(got["avx512_vnni"], got["reference"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 33, 70), (100, 32, 130)])  # next K = 70 / 130: a Kp padding tail / 4-aligned
@pytest.mark.parametrize("gelu", [False, True])
def test_epilogue_quantisation_bit_equal_to_quantising_the_float_output(ext, vnni, shape, gelu):
    # FFN up -> FFN down: the epilogue writes FFN down's u8 input; it must be exactly what quantising
    # the float output would give (same division, clamp and round half to even), for both kernels
    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    nxt_q = torch.randint(-127, 128, (5, n), dtype=torch.int8, generator=g)
    for kern in ("avx512_vnni", "reference"):
        w = ext.Int8Weight(w_q, torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g), 0.03, -128, gelu, kern)
        for qmin in (-128, -127):
            nxt = ext.Int8Weight(nxt_q, torch.ones(5), None, 0.01, qmin, False, kern)
            x = torch.randn(m, k, generator=g) * 3
            assert torch.equal(w.linear_into(x, nxt), ext.quantize_u8(w.linear(x), 0.01, qmin)), (kern, qmin)


@pytest.mark.parametrize("shape", [(1, 32, 2), (7, 33, 70), (13, 130, 200), (49, 128, 256), (97, 64, 192), (150, 64, 200), (11, 4, 64),
                                   (25, 384, 1152), (30, 1536, 384)])
@pytest.mark.parametrize("act_qmin", [-128, -127])
@pytest.mark.parametrize("gelu", [False, True])
def test_brgemm_kernel_bit_equal_to_vnni_kernel(ext, brgemm, shape, act_qmin, gelu):
    """Every row-block / panel split (tails of rows and of channels, K not a multiple of 4) and both
    epilogue outputs (float rows, the next GEMM's u8 input): the same bits as the avx512_vnni kernel."""
    m, k, n = shape
    g = torch.Generator().manual_seed(7 * m + k + n)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale, bias = torch.rand(n, generator=g) * 0.01 + 1e-4, torch.randn(n, generator=g)
    nxt_q = torch.randint(-127, 128, (5, n), dtype=torch.int8, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    out = {}
    for kern in ("avx512_vnni", brgemm):
        w = ext.Int8Weight(w_q, w_scale, bias, 0.02, act_qmin, gelu, kern)
        assert w.kernel == kern
        nxt = ext.Int8Weight(nxt_q, torch.ones(5), None, 0.01, act_qmin, False, kern)
        out[kern] = (w.linear(x), w.linear_into(x, nxt))
    assert torch.equal(out[brgemm][0], out["avx512_vnni"][0])
    assert torch.equal(out[brgemm][1], out["avx512_vnni"][1])


def test_brgemm_kernel_says_which_isa_onednn_generated_for(ext, brgemm):
    from ltp_compress.kernels import cpu_isa

    desc = ext.kernel_description(brgemm)
    amx = fused_encoder.brgemm_uses_amx()
    assert ("AMX tiles" in desc) == amx and ("AVX-512 VNNI" in desc) != amx
    if not cpu_isa()["amx_int8"]:
        assert not amx  # oneDNN cannot generate AMX code for a CPU without AMX


def test_brgemm_kernel_refused_with_onednn_capped_below_vnni(ext, brgemm):
    # ONEDNN_MAX_CPU_ISA=AVX2 makes torch's oneDNN act as on a CPU without AVX-512 VNNI: there torch
    # refuses u8 x s8 brgemm, and the kernel must say so (its reason), not run something else
    import subprocess
    import sys

    code = ("from ltp_compress.kernels import fused_encoder as f; r = f.gemm_kernel_unavailable_reason('onednn_brgemm'); "
            "print('REASON', r)")
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REASON torch's oneDNN brgemm refused" in res.stdout, res.stdout


def test_int8_weight_without_bias_and_unknown_kernel(ext, vnni):
    w_q = torch.randint(-127, 128, (20, 8), dtype=torch.int8)
    w = ext.Int8Weight(w_q, torch.ones(20), None, 1.0, -128, False, "avx512_vnni")
    x = torch.randint(-5, 6, (3, 8)).float()
    assert torch.equal(w.linear(x), (x @ w_q.float().T))  # small integers: exact in float32
    with pytest.raises(RuntimeError, match="unknown int8 gemm kernel"):
        ext.Int8Weight(w_q, torch.ones(20), None, 1.0, -128, False, "amx")


@pytest.mark.parametrize("act_qmin", [-128, -127])
def test_quantizer_bit_equal_to_kernels_quantizer(ext, act_qmin):
    from ltp_compress.kernels import quantize_u8_zp128

    scale = 0.05
    ties = (torch.arange(-140, 140).float() + 0.5) * scale  # exact .5 multiples: round half to even
    x = torch.cat([ties, torch.randn(1000) * 5, torch.tensor([0.0, -0.0, 1e-9, -1e9, 1e9])]).reshape(5, 257)  # 257: vector body + scalar tail
    assert torch.equal(ext.quantize_u8(x, scale, act_qmin), quantize_u8_zp128(x, scale, act_qmin))


def test_extension_runs_its_loops_on_torchs_thread_pool(ext):
    # at::parallel_for only parallelises code compiled with OpenMP: without -fopenmp every GEMM, head
    # and row loop of the runtime would silently run on one thread whatever `threads` says
    assert ext.parallel_compiled()
    before = torch.get_num_threads()
    try:
        assert ext.threads_used(64, 2) == 2
        assert ext.threads_used(64, 1) == 1
    finally:
        torch.set_num_threads(before)
    assert "OpenMP" in ext.kernel_description("avx512_vnni")


def test_vector_gelu_close_to_erf_gelu(ext):
    x = torch.linspace(-12, 12, 200_001)
    err = (ext.gelu(x).double() - F.gelu(x.double())).abs()
    assert float(err.max()) < 1e-6


def test_vector_tanh_close_to_tanh(ext):
    # the head's pooler activation: every length mod 16 (masked tails), tiny, large and signed inputs
    x = torch.cat([torch.linspace(-30, 30, 200_003), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 100.0, -100.0])])
    got = ext.tanh(x).double()
    err = (got - torch.tanh(x.double())).abs()
    assert float(err.max()) < 2e-7
    assert torch.equal(torch.sign(got), torch.sign(torch.tanh(x.double())))
    for n in range(1, 33):
        assert torch.allclose(ext.tanh(x[:n] * 0.01), torch.tanh(x[:n] * 0.01), rtol=0, atol=2e-7)


# ----------------------------------------------------------------------------- checkpoints


def _quantise(src, int8_attention: bool = False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ltp_compress.modeling.quantized import attach_int8_attention, calibrate, calibrate_attention, convert_to_int8

    model = AutoModelForSequenceClassification.from_pretrained(src, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(src)
    batches = _calibration_batches(tok)
    qmodel, info = convert_to_int8(model, calibrate(model, batches, PruningConfig()), "reference")
    if int8_attention:
        att = calibrate_attention(model, batches, PruningConfig())
        attach_int8_attention(qmodel, att)
        info.attention_matmuls, info.attention_scales = "int8", att
    return qmodel, tok, info


@torch.no_grad()
def _layer0_scores(qmodel, tok, texts) -> list[torch.Tensor]:
    """The reference runtime's layer-0 token scores of each text (bs 1; they do not depend on the threshold)."""
    from ltp_compress.modeling.pruned_encoder import _attention_scores, _qkv, _split_heads, embed, encoder_layers, num_heads

    layer, heads, out = encoder_layers(qmodel)[0], num_heads(qmodel), []
    for t in texts:
        enc = tok([t], return_tensors="pt", return_token_type_ids=True)
        x = embed(qmodel, enc["input_ids"], enc["token_type_ids"])
        q, k, _ = (_split_heads(v, heads) for v in _qkv(layer, x))
        probs = _attention_scores(layer, q, k).softmax(-1)
        out.append(probs.sum(dim=(1, 2))[0] / heads)
    return out


def _threshold_away_from_ties(scores: list[torch.Tensor]) -> tuple[float, float]:
    """Midpoint of the widest gap in the middle half of the sorted scores (position 0 excluded) and the margin."""
    real = torch.sort(torch.cat([s[1:] for s in scores])).values
    lo, hi = len(real) // 4, 3 * len(real) // 4
    gaps = real[lo + 1:hi + 1] - real[lo:hi]
    i = int(torch.argmax(gaps))
    return float((real[lo + i] + real[lo + i + 1]) / 2), float(gaps[i] / 2)


def _compare(ckpt, texts, batch_size: int, kernel: str) -> torch.Tensor:
    from ltp_compress.modeling.fused_runtime import load_fused

    ref, fused = load_deployable(ckpt), load_fused(ckpt, kernel=kernel)
    kept = []
    for s in range(0, len(texts), batch_size):
        enc = ref.encode(texts[s:s + batch_size])
        expected = ref.logits(enc)
        got = fused.logits(enc)
        assert torch.equal(fused.last_kept_tokens, ref.last_kept_tokens)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
        kept.append(fused.last_kept_tokens)
    return torch.cat(kept)


@pytest.fixture(scope="module")
def threshold_checkpoints(tiny_bert, tiny_roberta, tmp_path_factory) -> dict:
    """Per architecture and attention precision: a 2-layer checkpoint whose layer-0 threshold sits in
    a wide gap of the reference's scores of the mixed texts."""
    out = {}
    for kind, src in (("bert", tiny_bert), ("roberta", tiny_roberta)):
        for attention in ("fp32", "int8"):
            qmodel, tok, info = _quantise(src, int8_attention=attention == "int8")
            th, margin = _threshold_away_from_ties(_layer0_scores(qmodel, tok, _mixed_texts()))
            dst = tmp_path_factory.mktemp(f"fused_{kind}_{attention}") / "ckpt"
            out[(kind, attention)] = (save_deployable(qmodel, tok, PruningConfig(mode="threshold", thresholds=[th, 1.0]), info, dst), margin)
    return out


@pytest.mark.parametrize("attention", ["fp32", "int8"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_threshold_pruning_matches_reference_bs1_and_bs7(threshold_checkpoints, vnni, kind, attention):
    ckpt, margin = threshold_checkpoints[(kind, attention)]
    assert margin > 1e-5
    texts = _mixed_texts()
    kept7 = _compare(ckpt, texts, 7, vnni)
    kept1 = _compare(ckpt, texts, 1, vnni)
    assert torch.equal(kept7, kept1)
    assert (kept7[:, 1] < kept7[:, 0]).sum() >= 3 and (kept7[:, 1] > 1).all()  # really pruned, not everything


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_batch_larger_than_one_group_matches_reference(threshold_checkpoints, vnni, kind):
    """A batch of more tokens than one group (the extension runs a batch in groups of consecutive
    sequences of at most 256 tokens): logits and kept tokens row for row as the reference."""
    ckpt, _ = threshold_checkpoints[(kind, "fp32")]
    texts = [t + " " + " ".join(["and the film was long"] * k) for k in (2, 9, 5, 12) for t in _mixed_texts()]
    enc = load_deployable(ckpt).encode(texts)
    assert int(enc["attention_mask"].sum()) > 3 * 256  # several groups
    kept = _compare(ckpt, texts, len(texts), vnni)
    assert torch.equal(kept, _compare(ckpt, texts, 1, vnni))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_every_schedule_gives_the_same_numbers(vnni, tmp_path, kind):
    """How forward() walks a batch (spans through every layer, each layer on groups re-formed from the
    tokens entering it) changes no number: every op is row-wise or per sequence and the integer sums
    are exact, so logits and kept tokens are bit-equal under every schedule, the default included."""
    from ltp_compress.modeling.fused_runtime import load_fused

    src = build_tiny_model(tmp_path / "src", kind, num_layers=3, seed=2)
    qmodel, tok, info = _quantise(src)
    ckpt = save_deployable(qmodel, tok, PruningConfig(mode="topk", keep_ratios=[0.5, 0.3, 0.3]), info, tmp_path / "ckpt")
    fused = load_fused(ckpt, kernel=vnni, threads=2)
    texts = [t + " " + " ".join(["and the film was long"] * k) for k in (2, 9, 0, 12, 5) for t in _mixed_texts()]
    enc = fused.encode(texts)
    assert int(enc["attention_mask"].sum()) > 3 * 256  # several spans and groups at layer 0
    default = fused.encoder.schedule
    expected, kept = fused.logits(enc), fused.last_kept_tokens
    assert (kept[:, 2] < kept[:, 0]).all()
    for span, group in ((1, 1), (64, 1), (10**6, 256), (10**6, 10**6), (256, 40), (300, 10**6)):
        fused.encoder.set_schedule(span, group)
        assert fused.encoder.schedule == (span, group)
        assert torch.equal(fused.logits(enc), expected), (span, group)
        assert torch.equal(fused.last_kept_tokens, kept), (span, group)
    fused.encoder.set_schedule(*default)
    torch.testing.assert_close(expected, load_deployable(ckpt).logits(enc), rtol=RTOL, atol=ATOL)
    with pytest.raises(RuntimeError, match="must be >= 1"):
        fused.encoder.set_schedule(0, 256)


def test_reference_gemm_kernel_gives_the_same_model(threshold_checkpoints, ext):
    """The whole forward with the plain C++ GEMM (exact int32 like the VNNI kernel) matches too."""
    ckpt, _ = threshold_checkpoints[("bert", "fp32")]
    _compare(ckpt, _mixed_texts(), 7, "reference")


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_brgemm_gemm_kernel_gives_the_same_model(threshold_checkpoints, brgemm, kind):
    """The whole forward with oneDNN's brgemm: kept tokens and logits as the reference at bs 7 and 1,
    and logits bit-equal to the avx512_vnni kernel's model."""
    from ltp_compress.modeling.fused_runtime import load_fused

    ckpt, _ = threshold_checkpoints[(kind, "int8")]
    texts = _mixed_texts()
    assert torch.equal(_compare(ckpt, texts, 7, brgemm), _compare(ckpt, texts, 1, brgemm))
    a, b = load_fused(ckpt, kernel=brgemm), load_fused(ckpt, kernel="avx512_vnni")
    assert a.backend == "fused:onednn_brgemm" and "oneDNN" in a.kernel_path()
    enc = a.encode(texts)
    assert torch.equal(a.logits(enc), b.logits(enc))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_topk_three_layers_matches_reference(vnni, tmp_path, kind):
    """Top-k pruning over three layers (two of them prune), bs 7 mixed and bs 1, plus dev texts at bs 4."""
    src = build_tiny_model(tmp_path / "src", kind, num_layers=3, seed=1)
    qmodel, tok, info = _quantise(src)
    ckpt = save_deployable(qmodel, tok, PruningConfig(mode="topk", keep_ratios=[0.7, 0.4, 0.4]), info, tmp_path / "ckpt")
    texts = _mixed_texts()
    kept7 = _compare(ckpt, texts, 7, vnni)
    assert torch.equal(kept7, _compare(ckpt, texts, 1, vnni))
    assert (kept7[:, 2] < kept7[:, 1]).all() and (kept7[:, 1] < kept7[:, 0]).all()
    _compare(ckpt, _dev_texts(12), 4, vnni)


def test_no_pruning_and_public_load(threshold_checkpoints, vnni):
    from ltp_compress.modeling.fused_runtime import FusedDeployedModel

    from ltp_compress.modeling.fused_runtime import default_gemm_kernel

    ckpt, _ = threshold_checkpoints[("roberta", "fp32")]
    dm = ltp_compress.load(ckpt, runtime="fused", threads=1)
    kernel = default_gemm_kernel()  # FUSED_GEMM_TABLE's row for this CPU
    if fused_encoder.gemm_kernel_unavailable_reason(kernel) is not None:
        pytest.skip(f"this CPU's table kernel {kernel} is unavailable: {fused_encoder.gemm_kernel_unavailable_reason(kernel)}")
    assert dm.runtime == "fused" and dm.backend == f"fused:{kernel}"
    if kernel == "avx512_vnni":
        assert "vpdpbusd" in dm.kernel_path() and "no AMX" in dm.kernel_path()
    else:
        assert kernel == "onednn_brgemm" and "AMX tiles" in dm.kernel_path()
    texts = _dev_texts(5)
    ref = load_deployable(ckpt)
    for a, b in zip(dm.predict(texts), ref.predict(texts)):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
    # pruning "none": every token enters every layer
    ref.pruning = PruningConfig()
    dense = FusedDeployedModel(ref)
    enc = ref.encode(texts)
    torch.testing.assert_close(dense.logits(enc), ref.logits(enc), rtol=RTOL, atol=ATOL)
    assert torch.equal(dense.last_kept_tokens, ref.last_kept_tokens)
    assert torch.equal(dense.last_kept_tokens[:, 1], enc["attention_mask"].sum(1))


def test_streams_run_batches_at_once_with_the_same_results(threshold_checkpoints, vnni):
    """streams=2 (the throughput setting): logits_many runs two batches at once, one thread each; the
    logits and kept tokens are the one-at-a-time ones, in order."""
    from ltp_compress.errors import SettingError
    from ltp_compress.modeling.fused_runtime import load_fused

    ckpt, _ = threshold_checkpoints[("bert", "fp32")]
    texts = _mixed_texts()
    one, many = load_fused(ckpt, threads=2), load_fused(ckpt, threads=2, streams=2)
    assert many.stream_threads == 1 and one.stream_threads == 2
    batches = [one.encode(texts[s:s + 3]) for s in range(0, len(texts), 3)]
    expected = one.logits_many(batches)
    kept = one.last_kept_tokens
    for _ in range(3):  # several passes: the pool's threads are reused
        got = many.logits_many(batches)
        assert len(got) == len(expected) and torch.equal(many.last_kept_tokens, kept)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)
    with pytest.raises(SettingError, match="streams"):
        load_fused(ckpt, streams=0)


def test_unavailable_kernel_is_an_error_not_a_fallback(threshold_checkpoints, ext):
    from ltp_compress.modeling.fused_runtime import load_fused

    ckpt, _ = threshold_checkpoints[("bert", "fp32")]
    with pytest.raises(RuntimeError, match="not available"):
        load_fused(ckpt, kernel="amx")


def test_left_padding_refused(threshold_checkpoints, vnni):
    from ltp_compress.modeling.fused_runtime import load_fused

    dm = load_fused(threshold_checkpoints[("bert", "fp32")][0])
    enc = dm.encode(["a good movie", "a really very good long movie indeed"])
    enc["attention_mask"] = enc["attention_mask"].flip(1)
    with pytest.raises(RuntimeError, match="right-padded"):
        dm.logits(enc)


# ----------------------------------------------------------------------------- runtime="auto"


def _expected_auto_runtime() -> str:
    """What AUTO_TABLE says for a deployable checkpoint on this CPU (backend 'auto')."""
    from ltp_compress.kernels import cpu_isa

    from ltp_compress.modeling.fused_runtime import default_gemm_kernel

    isa = cpu_isa()
    if isa["avx512_vnni"] and isa["avx512"] and fused_encoder.gemm_kernel_unavailable_reason(default_gemm_kernel()) is None:
        return "fused"
    return "torch"


def test_fused_gemm_table_amx_takes_brgemm_else_vnni(monkeypatch):
    """FUSED_GEMM_TABLE by CPU flags: AMX (with AVX-512 VNNI) -> onednn_brgemm, AVX-512 VNNI without AMX
    -> avx512_vnni, neither -> no row; every row names a kernel the extension has."""
    import ltp_compress.kernels as K
    from ltp_compress.modeling import runtime_choice as rc
    from ltp_compress.modeling.fused_runtime import default_gemm_kernel

    assert all(r.kernel in fused_encoder.GEMM_KERNELS and r.why for r in rc.FUSED_GEMM_TABLE)
    base = {k: False for k in K.cpu_isa()}
    for flags, expected in (({"amx_int8": True, "avx512_vnni": True, "avx512": True}, "onednn_brgemm"),
                            ({"avx512_vnni": True, "avx512": True}, "avx512_vnni"), ({"amx_int8": True}, None), ({}, None)):
        monkeypatch.setattr(K, "cpu_isa", lambda flags=flags: {**base, **flags})
        rule = rc.fused_gemm_rule()
        assert (rule.kernel if rule else None) == expected, flags
        assert default_gemm_kernel() == (expected or "avx512_vnni")
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    assert rc.fused_gemm_table_markdown() in docs, "docs/export.md shows FUSED_GEMM_TABLE: regenerate it with fused_gemm_table_markdown()"


def test_auto_follows_the_table_for_a_deployable_checkpoint(threshold_checkpoints, capsys):
    """runtime='auto' on a safetensors checkpoint: fused where the CPU has AVX-512 VNNI and the extension
    builds, else torch (with the reason on stderr when the CPU row matched but could not be followed);
    an explicit torch backend keeps torch; the result reports the row that chose it."""
    ckpt, _ = threshold_checkpoints[("bert", "fp32")]
    dm = ltp_compress.load(ckpt, threads=1)
    assert dm.runtime == _expected_auto_runtime(), dm.runtime_choice
    assert dm.runtime_choice.startswith("auto: deployable checkpoint")
    assert ("-> fused" in dm.runtime_choice) == (dm.runtime == "fused")
    if dm.runtime == "fused":
        assert f"int8 GEMM kernel {dm.kernel}" in dm.runtime_choice
    ref = ltp_compress.load(ckpt, runtime="torch")
    assert ref.runtime == "torch" and ref.runtime_choice == "requested"
    texts = _dev_texts(4)
    for a, b in zip(dm.predict(texts), ref.predict(texts)):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)
    explicit = ltp_compress.load(ckpt, backend="reference")
    assert explicit.runtime == "torch" and explicit.backend == "reference" and explicit.runtime_choice.endswith("-> torch")


def test_auto_passes_over_a_table_kernel_that_cannot_run_to_the_next_row(threshold_checkpoints, vnni, monkeypatch, capsys):
    """An AMX CPU whose oneDNN refuses brgemm (simulated: AMX flags reported, onednn_brgemm refused): auto runs the
    fused runtime on the next row's kernel, saying on stderr and in runtime_choice why the first was passed over."""
    import ltp_compress.kernels as K

    real_isa, real_reason = K.cpu_isa(), fused_encoder.gemm_kernel_unavailable_reason
    monkeypatch.setattr(K, "cpu_isa", lambda: {**real_isa, "amx_int8": True, "amx_tile": True})
    monkeypatch.setattr(fused_encoder, "gemm_kernel_unavailable_reason",
                        lambda k: "refused for this test" if k == "onednn_brgemm" else real_reason(k))
    ckpt, _ = threshold_checkpoints[("bert", "fp32")]
    dm = ltp_compress.load(ckpt, threads=1)
    assert dm.runtime == "fused" and dm.kernel == "avx512_vnni"
    assert "onednn_brgemm not used: refused for this test" in dm.runtime_choice
    assert "int8 GEMM kernel avx512_vnni" in dm.runtime_choice
    assert "onednn_brgemm kernel is not used: refused for this test" in capsys.readouterr().err


def test_auto_without_avx512_vnni_is_torch(threshold_checkpoints, monkeypatch):
    """Under ONEDNN_MAX_CPU_ISA=AVX2 cpu_isa() reports no AVX-512 VNNI, so the table's CPU row does
    not match and the checkpoint runs on torch (what a CPU without AVX-512 VNNI gets)."""
    from ltp_compress.kernels import cpu_isa

    ckpt, _ = threshold_checkpoints[("bert", "fp32")]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu_isa.cache_clear()
    try:
        dm = ltp_compress.load(ckpt)
    finally:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        cpu_isa.cache_clear()
    assert dm.runtime == "torch" and dm.runtime_choice.startswith("auto: deployable checkpoint on any other")


def test_auto_checks_the_folder_before_building_the_extension(tmp_path, monkeypatch):
    """A missing or broken folder is a CheckpointError naming it before the extension is built or probed
    (a build takes a minute the first time; a typo should not wait for it)."""
    from ltp_compress.errors import CheckpointError
    from ltp_compress.modeling import runtime_choice

    def no_build(kernel):
        raise AssertionError("the extension was probed before the folder was checked")

    monkeypatch.setattr(fused_encoder, "gemm_kernel_unavailable_reason", no_build)
    monkeypatch.setattr(runtime_choice, "auto_rule", lambda path, backend="auto": runtime_choice.AUTO_TABLE[1])  # the fused row
    with pytest.raises(CheckpointError, match="not found"):
        ltp_compress.load(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    with pytest.raises(CheckpointError, match="broken"):
        ltp_compress.load(tmp_path / "broken")


def test_auto_refused_checkpoint_runs_on_torch_and_says_why(tiny_bert, vnni, tmp_path, capsys):
    """A checkpoint with a float Linear (fp_layers): the fused runtime refuses it, so 'auto' names the
    reason on stderr and in runtime_choice and runs it on torch; runtime='fused' is an error."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ltp_compress.errors import CheckpointError
    from ltp_compress.modeling.quantized import calibrate, convert_to_int8

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    qmodel, info = convert_to_int8(model, calibrate(model, _calibration_batches(tok), PruningConfig()), "reference",
                                   fp_layers=("classifier",))
    ckpt = save_deployable(qmodel, tok, PruningConfig(), info, tmp_path / "ckpt")
    dm = ltp_compress.load(ckpt)
    assert dm.runtime == "torch" and "not followed" in dm.runtime_choice and "classifier" in dm.runtime_choice
    assert "fused runtime is not used" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="classifier"):
        ltp_compress.load(ckpt, runtime="fused")


def test_auto_table_rows_name_known_runtimes():
    from ltp_compress.modeling.runtime_choice import AUTO_TABLE, RUNTIMES, auto_table_markdown

    assert {r.runtime for r in AUTO_TABLE} <= set(RUNTIMES) - {"auto"}
    assert auto_table_markdown().count("\n") == len(AUTO_TABLE) + 1
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    assert auto_table_markdown() in docs, "docs/export.md shows AUTO_TABLE: regenerate it with auto_table_markdown()"


def test_build_lock_left_by_a_killed_builder_does_not_block_the_next_build(tmp_path, capsys):
    """torch's JIT lock file of a builder killed by a signal is removed (not waited on forever), and our flock
    held by a process killed with SIGKILL is released by the OS: the next builder gets in."""
    import signal
    import subprocess
    import sys

    (tmp_path / fused_encoder.TORCH_LOCK_FILE).write_text("")
    with fused_encoder._build_lock(tmp_path):
        assert not (tmp_path / fused_encoder.TORCH_LOCK_FILE).exists()
    assert "a build lock left by a build process that died" in capsys.readouterr().err

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(tmp_path / fused_encoder.BUILD_LOCK_FILE)!r}, 'a')\n"
        "fcntl.flock(h, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        import fcntl
        with open(tmp_path / fused_encoder.BUILD_LOCK_FILE, "a") as h:  # held by the live process: not ours to take
            with pytest.raises(BlockingIOError):
                fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with open(tmp_path / fused_encoder.BUILD_LOCK_FILE, "a") as h:  # the OS released it with its dead holder
            fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(h, fcntl.LOCK_UN)
        with fused_encoder._build_lock(tmp_path):
            pass
    finally:
        holder.kill()


def test_alternative_kernel_sources_build_in_their_own_folder(tmp_path, monkeypatch):
    # LTP_FUSED_SOURCE_DIR (an A/B of kernel sources): another copy of kernels/fused/ is hashed and built on its own
    import shutil

    monkeypatch.delenv("LTP_FUSED_SOURCE_DIR", raising=False)
    own = fused_encoder.source_info()
    assert own["checkout_sources"] and Path(own["dir"]) == fused_encoder.SOURCE_DIR
    own_build = fused_encoder.build_directory()
    copy = tmp_path / "fused"
    shutil.copytree(fused_encoder.SOURCE_DIR, copy)
    with open(copy / "int8_gemm.h", "a") as f:
        f.write("\n// another revision\n")
    monkeypatch.setenv("LTP_FUSED_SOURCE_DIR", str(copy))
    other = fused_encoder.source_info()
    assert not other["checkout_sources"] and Path(other["dir"]) == copy.resolve()
    assert other["hash"] != own["hash"]
    assert fused_encoder.build_directory() != own_build and other["hash"] in fused_encoder.build_directory().name
