"""Tests for ltp_compress.kernels.linear_int8 (CPU; GPU tests are marked and skipped without CUDA).

Tolerance for dequantised outputs (all backends vs the float64-epilogue reference on the SAME
int8 inputs): max|y - y_ref| <= 1e-5 * max|y_ref| + 1e-6. The int32 accumulation itself is
checked bit-exactly (raw accumulators for reference / cpu_int_mm; for every backend via unit
scales and no bias: the fp32 output must equal the exact accumulator rounded once to fp32).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from ltp_compress import kernels as K

CPU_BACKENDS = [b for b in ("reference", "cpu_vnni", "cpu_avx2", "cpu_int_mm")]
RTOL, ATOL = 1e-5, 1e-6


def _avail(backend: str, device: str = "cpu") -> bool:
    return K.backend_unavailable_reason(backend, device) is None


def _skip_unavailable(backend: str, device: str = "cpu") -> None:
    reason = K.backend_unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)


def _make(m_shape, k, n, backend, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*m_shape, k, generator=g)  # [..., K]
    w = torch.randn(n, k, generator=g) * 0.05  # [N, K]
    b = torch.randn(n, generator=g) if bias else None  # [N]
    w_q, w_scale = K.quantize_per_channel_symmetric(w, qmax=K.weight_qmax(backend))
    x_scale = float(x.abs().max()) / 127
    return x, x_scale, w_q, w_scale, b


def _assert_close(y, ref):
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref.double()).abs().max().item() if y.numel() else 0.0
    bound = RTOL * ref.abs().max().item() + ATOL if y.numel() else 0.0
    assert err <= bound, f"max abs diff {err:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("qmax", [127, 63])
def test_per_channel_roundtrip_bound(qmax):
    w = torch.randn(96, 200) * torch.logspace(-3, 1, 96)[:, None]
    w[5] = 0.0  # all-zero row must not produce NaN
    w_q, scale = K.quantize_per_channel_symmetric(w, qmax=qmax)
    assert w_q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (96,)
    assert int(w_q.abs().max()) <= qmax
    assert torch.all(w_q.abs().amax(1)[torch.arange(96) != 5] == qmax)  # row max hits qmax
    err = (w - w_q.float() * scale[:, None]).abs()
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12)
    assert torch.all(w_q[5] == 0)


def test_per_tensor_quant_half_even_and_clamp():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1000.0, -1000.0, 126.6])
    q = K.quantize_per_tensor_symmetric(x, 1.0)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -127, 127]
    assert K.quantize_per_tensor_symmetric(x, torch.tensor(1.0)).tolist() == q.tolist()


def test_activation_ranges_lower_bound():
    """'full' keeps -128 where 'symmetric' clamps to -127; both round half-to-even and top out at 127;
    an unknown range name is an error naming the known ones."""
    x = torch.tensor([-127.4, -127.5, -127.6, -128.4, -128.6, -1000.0, 127.6])
    assert K.quantize_per_tensor_symmetric(x, 1.0, K.act_qmin_of("symmetric")).tolist() == [-127, -127, -127, -127, -127, -127, 127]
    assert K.quantize_per_tensor_symmetric(x, 1.0, K.act_qmin_of("full")).tolist() == [-127, -128, -128, -128, -128, -128, 127]
    assert K.ACTIVATION_RANGES == {"symmetric": -127, "full": -128}
    with pytest.raises(ValueError, match="full"):
        K.act_qmin_of("asymmetric")
    with pytest.raises(ValueError, match="act_qmin"):
        K.Int8Linear(torch.zeros(4, 4, dtype=torch.int8), torch.ones(4), None, 1.0, backend="reference", act_qmin=-126)


@pytest.mark.parametrize("act_qmin", [-127, -128])
@pytest.mark.parametrize("zp,dtype", [(0, torch.int8), (128, torch.uint8)])
def test_hot_path_quantiser_bit_identical(zp, dtype, act_qmin):
    """The fast CPU quantiser used by int8_linear == quantize_per_tensor_symmetric (+ zp) in both
    activation ranges, including exact .5 ties (half-to-even), clamping and +-inf."""
    from ltp_compress.kernels.linear_int8 import _quantize_fast

    s = 0.0371
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * s
    x = torch.cat([ties, torch.randn(50_000) * s * 60, torch.tensor([1e30, -1e30, float("inf"), -float("inf"), 0.0, -0.0])])
    q = _quantize_fast(x, s, zp, dtype, act_qmin)
    ref = (K.quantize_per_tensor_symmetric(x, s, act_qmin).to(torch.int16) + zp).to(dtype)
    assert q.dtype == dtype and torch.equal(q, ref)
    assert int(ref.to(torch.int16).min()) - zp == act_qmin  # the lower bound is reached (and not passed)
    x2 = torch.randn(6, 10).t()  # non-contiguous input
    assert torch.equal(_quantize_fast(x2, s, zp, dtype, act_qmin),
                       (K.quantize_per_tensor_symmetric(x2, s, act_qmin).to(torch.int16) + zp).to(dtype))


# ----------------------------------------------------------------------------- backends


def test_import_does_not_probe_hardware():
    code = (
        "import ltp_compress.kernels as K; "
        "assert K.int8_linear.__module__; "
        "from ltp_compress.kernels.linear_int8 import cpu_isa; "
        "assert cpu_isa.cache_info().currsize == 0, 'probed at import'; print('OK')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_resolve_backend_auto_and_errors():
    isa = K.cpu_isa()
    expected = "cpu_vnni" if isa["vnni"] else ("cpu_avx2" if isa["avx2"] else "reference")
    assert K.resolve_backend("auto", "cpu") == expected
    with pytest.raises(ValueError):
        K.resolve_backend("nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            K.resolve_backend("cuda", "cpu")
        with pytest.raises(RuntimeError):
            K.resolve_backend("cuda", "cuda")
        with pytest.raises(RuntimeError):
            K.pack_weight(torch.zeros(8, 8, dtype=torch.int8), torch.ones(8), None, "cuda")
    with pytest.raises(RuntimeError):
        K.resolve_backend("cpu_vnni", "meta")
    if not isa["vnni"]:
        with pytest.raises(RuntimeError):
            K.resolve_backend("cpu_vnni", "cpu")


def _onednn_fp32_exact_k(qmax: int) -> int:
    """Largest K for which a oneDNN u8 x s8 kernel's unit-scale fp32 output is guaranteed exact.

    The cpu_vnni / cpu_avx2 backends feed x_q + 128 (u8, [1, 255]) and oneDNN subtracts the
    zero-point compensation 128 * sum_k w[n, k]. Every intermediate it may hold (the u8
    accumulator, the compensation, the result) is an integer of magnitude <= 255 * qmax * K; while
    that is <= 2^24 each is exactly representable in fp32, so the output is the exact accumulator
    whichever way the kernel subtracts (int32 on AVX-512 VNNI, fp32 on AMX). Above it see
    :func:`_onednn_fp32_error_bound`."""
    return (1 << 24) // (255 * qmax)


def _onednn_fp32_error_bound(qmax: int, k: int) -> float:
    """|y - acc| bound above the exact range: the u8 accumulator, the compensation and the result
    each rounded once to fp32 (relative error 2^-24), magnitudes 255, 128 and 127 * qmax * K."""
    return (255 + 128 + 127) * qmax * k * 2.0**-24


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 64, 48), (17, 384, 1536), (64, 1536, 384), (5, 30, 33)])
def test_int32_accumulators_bit_exact(backend, shape):
    """Raw accumulators (reference, cpu_int_mm): exact int32 on every shape. oneDNN's fp32 output
    at unit scales: the exact accumulator while K <= _onednn_fp32_exact_k (all shapes here but
    K=1536), within _onednn_fp32_error_bound above it (on AMX oneDNN applies the u8 zero-point
    compensation in fp32; on AVX-512 VNNI it happens to stay exact there too)."""
    _skip_unavailable(backend)
    m, k, n = shape
    qmax = K.weight_qmax(backend)
    g = torch.Generator().manual_seed(m * 7 + k)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w_q = torch.randint(-qmax, qmax + 1, (n, k), dtype=torch.int8, generator=g)
    x_q[0] = 127  # worst-case row: every product at its maximum
    w_q[0] = qmax
    exact = x_q.to(torch.int64) @ w_q.to(torch.int64).T  # [M, N]
    if backend in ("reference", "cpu_int_mm"):
        acc = K.int8_matmul_int32(x_q, w_q, backend)
        assert acc.dtype == torch.int32 and torch.equal(acc.to(torch.int64), exact)
    else:
        with pytest.raises(NotImplementedError):
            K.int8_matmul_int32(x_q, w_q, backend)
    packed = K.pack_weight(w_q, torch.ones(n), None, backend)
    y = K.int8_linear(x_q.float(), 1.0, packed)  # quantises x_q.float() back to x_q exactly
    if backend in ("reference", "cpu_int_mm") or k <= _onednn_fp32_exact_k(qmax):
        # exact int32 accumulator, rounded once to fp32 (identity while |acc| < 2^24)
        assert torch.equal(y, exact.to(torch.float32))
    else:
        err = (y.double() - exact.double()).abs().max().item()
        assert err <= _onednn_fp32_error_bound(qmax, k), (err, _onednn_fp32_error_bound(qmax, k))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fuse_gelu", [False, True])
@pytest.mark.parametrize(
    "m_shape,k,n", [((1,), 32, 32), ((3,), 32, 32), ((3,), 384, 1536), ((2, 7), 768, 96), ((130,), 1536, 384)]
)
def test_backend_matches_reference(backend, bias, fuse_gelu, m_shape, k, n):
    _skip_unavailable(backend)
    x, x_scale, w_q, w_scale, b = _make(m_shape, k, n, backend, bias=bias)
    packed = K.pack_weight(w_q, w_scale, b, backend)
    y = K.int8_linear(x, x_scale, packed, fuse_gelu=fuse_gelu)  # [..., N]
    assert y.shape == (*m_shape, n)
    x_q = K.quantize_per_tensor_symmetric(x, x_scale)
    ref = K.int8_linear_reference(x_q, x_scale, w_q, w_scale, b, fuse_gelu=fuse_gelu)
    _assert_close(y, ref)
    # and the int8 layer approximates the float layer (sanity on the dequant epilogue)
    w = w_q.float() * w_scale[:, None]
    fp = F.linear(x, w, b)
    if fuse_gelu:
        fp = F.gelu(fp)
    assert (y - fp).abs().max() < 0.05 * fp.abs().max() + 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act_qmin", [-127, -128])
def test_backend_matches_reference_where_activations_saturate(backend, act_qmin):
    """Activation scale 8x too small: many inputs fall below -128.5 * x_scale, so the activation
    range's lower bound decides the result; every backend (u8 with zero-point 128, s8 x s8) must
    keep exactly the reference's bound, and the two ranges really differ there."""
    _skip_unavailable(backend)
    x, x_scale, w_q, w_scale, b = _make((5,), 64, 48, backend, bias=True)
    x_scale = float(torch.tensor(x_scale / 8, dtype=torch.float32))  # as Int8Linear stores it
    packed = K.pack_weight(w_q, w_scale, b, backend)
    y = K.int8_linear(x, x_scale, packed, act_qmin=act_qmin)
    x_q = K.quantize_per_tensor_symmetric(x, x_scale, act_qmin)
    assert int(x_q.min()) == act_qmin
    _assert_close(y, K.int8_linear_reference(x_q, x_scale, w_q, w_scale, b))
    other = K.quantize_per_tensor_symmetric(x, x_scale, -255 - act_qmin)  # the other range
    assert not torch.allclose(y, K.int8_linear_reference(other, x_scale, w_q, w_scale, b))
    mod = K.Int8Linear(w_q, w_scale, b, x_scale, backend=backend, act_qmin=act_qmin)
    assert torch.equal(mod(x), y) and f"act_range=[{act_qmin}, 127]" in repr(mod)


def test_reference_is_exact_against_float64():
    x, x_scale, w_q, w_scale, b = _make((9,), 3072, 40, "reference")
    x_q = K.quantize_per_tensor_symmetric(x, x_scale)
    y = K.int8_linear_reference(x_q, x_scale, w_q, w_scale, b, fuse_gelu=True)
    acc = x_q.double() @ w_q.double().T
    exp = F.gelu(acc * x_scale * w_scale.double() + b.double()).float()
    assert torch.equal(y, exp)


def test_avx2_weight_range_enforced():
    _skip_unavailable("cpu_avx2")
    w_q = torch.full((8, 16), 100, dtype=torch.int8)
    with pytest.raises(ValueError, match="63"):
        K.pack_weight(w_q, torch.ones(8), None, "cpu_avx2")


# ----------------------------------------------------------------------------- which kernel ran


@pytest.mark.parametrize(
    "backend,kernel", [(b, K.KERNEL_COUNTER[b]) for b in ("cpu_vnni", "cpu_avx2", "cpu_int_mm", "reference")],
)
def test_kernel_counters(backend, kernel):
    _skip_unavailable(backend)
    x, x_scale, w_q, w_scale, b = _make((4, 8), 64, 32, backend)
    packed = K.pack_weight(w_q, w_scale, b, backend)
    K.reset_kernel_counters()
    K.int8_linear(x, x_scale, packed)
    K.int8_linear(x, x_scale, packed, fuse_gelu=True)
    c = K.kernel_counters()
    assert c == {kernel: 2}, c  # exactly that kernel, nothing else (no silent fallback)


def test_module_from_float_forward_and_repr():
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    x_scale = float(x.abs().max()) / 127
    for backend in [b for b in CPU_BACKENDS if _avail(b)] + ["auto"]:
        mod = K.Int8Linear.from_float(lin, x_scale, backend=backend, fuse_gelu=True)
        assert mod.backend != "auto" and f"backend={mod.backend}" in repr(mod)
        y = mod(x)
        assert y.shape == (2, 5, 48)
        x_q = K.quantize_per_tensor_symmetric(x, x_scale)
        ref = K.int8_linear_reference(x_q, x_scale, mod.w_q, mod.w_scale, mod.bias, fuse_gelu=True)
        _assert_close(y, ref)
        # state_dict round trip rebuilds the packed weight
        mod2 = K.Int8Linear(torch.zeros_like(mod.w_q), torch.ones(48), torch.zeros(48), 1.0, backend=mod.backend, fuse_gelu=True)
        mod2(x)  # packs the zero weight
        mod2.load_state_dict(mod.state_dict())
        assert torch.equal(mod2(x), y)
    assert set(mod.state_dict()) == {"w_q", "w_scale", "bias", "x_scale"}


def test_cpu_vnni_runs_onednn_op_profiler():
    """The cpu_vnni path calls onednn::qlinear_pointwise with a uint8 activation (the fast
    u8 x s8 kernel), not a signed-int8 source (oneDNN's slow ref_int8 kernel)."""
    _skip_unavailable("cpu_vnni")
    x, x_scale, w_q, w_scale, b = _make((16,), 64, 32, "cpu_vnni")
    packed = K.pack_weight(w_q, w_scale, b, "cpu_vnni")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        K.int8_linear(x, x_scale, packed, fuse_gelu=True)
    events = [e for e in prof.events() if e.name == "onednn::qlinear_pointwise"]
    assert len(events) == 1
    assert not any(e.name in ("aten::_int_mm", "aten::mm") for e in prof.events())
    assert events[0].input_dtypes[0] == "unsigned char", events[0].input_dtypes  # uint8 source


_VERBOSE_SCRIPT = textwrap.dedent(
    """
    import torch
    from ltp_compress import kernels as K
    backend = K.resolve_backend("{backend}")
    print("RESOLVED", backend, K.resolve_backend("auto"), flush=True)
    g = torch.Generator().manual_seed(0)
    m, k, n = 64, 384, 256
    qmax = K.weight_qmax(backend)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w_q = torch.randint(-qmax, qmax + 1, (n, k), dtype=torch.int8, generator=g)
    x_q[0] = 127; w_q[0] = qmax; x_q[1] = -127
    packed = K.pack_weight(w_q, torch.ones(n), None, backend)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        y = K.int8_linear(x_q.float(), 1.0, packed)
    exact = (x_q.double() @ w_q.double().T)
    print("EXACT", bool(torch.equal(y.double(), exact)), flush=True)
    """
)


def _run_verbose(backend: str, env_extra: dict) -> str:
    env = dict(os.environ, **env_extra)
    env.pop("ONEDNN_VERBOSE", None)
    r = subprocess.run(
        [sys.executable, "-c", _VERBOSE_SCRIPT.format(backend=backend)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _exec_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("onednn_verbose") and ",exec," in ln and ",matmul," in ln]


def test_cpu_vnni_onednn_implementation_is_not_reference():
    """oneDNN verbose log: the matmul primitive is a JIT VNNI kernel with a u8 source, never
    'ref_int8' (the ~1000x slower path signed activations take)."""
    _skip_unavailable("cpu_vnni")
    out = _run_verbose("cpu_vnni", {})
    lines = _exec_lines(out)
    assert lines, out
    for ln in lines:
        assert "ref" not in ln.split(",")[6], ln  # implementation field
        assert "src:u8" in ln, ln
    # an ISA with VNNI (vpdpbusd): avx512_core_vnni, avx_vnni, AVX10 (includes VNNI) or AMX
    assert any(isa in lines[0].split(",")[6] for isa in ("vnni", "amx", "avx10")), lines[0]
    assert "EXACT True" in out


def test_cpu_avx2_real_avx2_kernel_is_exact():
    """Under ONEDNN_MAX_CPU_ISA=AVX2 oneDNN really runs its non-VNNI u8 x s8 kernel
    (vpmaddubsw, int16 saturation); with 7-bit weights the result must still be exact, and
    'auto' must pick cpu_avx2 because cpu_isa() honours the cap."""
    if not _avail("cpu_avx2"):
        pytest.skip(K.backend_unavailable_reason("cpu_avx2"))
    out = _run_verbose("cpu_avx2", {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert "RESOLVED cpu_avx2 cpu_avx2" in out, out
    lines = _exec_lines(out)
    assert lines, out
    for ln in lines:
        impl = ln.split(",")[6]
        assert "ref" not in impl and "vnni" not in impl and "avx512" not in impl, ln
    assert "EXACT True" in out, out


# CPU flags each oneDNN ISA cap needs; a cap the CPU cannot reach is skipped (oneDNN would run a
# lower ISA and the run would repeat another one).
_ISA_CAP_NEEDS = {"AVX512_CORE_VNNI": "avx512_vnni", "AVX2": "avx2"}


@pytest.mark.parametrize("cap", sorted(_ISA_CAP_NEEDS))
def test_kernel_tests_pass_under_a_capped_onednn_isa(cap):
    """This file again with ONEDNN_MAX_CPU_ISA=cap, so a CPU with AMX also exercises the
    AVX-512 VNNI and AVX2 kernels (cpu_isa() honours the cap, so the backends the cap removes are
    skipped, and 'auto' resolves below it); the verbose-log tests in the child check that the
    kernel that ran is of the capped ISA (no 'amx' under either cap)."""
    from ltp_compress.kernels.linear_int8 import _read_cpu_flags

    flags = _read_cpu_flags() or set()
    if _ISA_CAP_NEEDS[cap] not in flags:
        pytest.skip(f"this CPU has no {_ISA_CAP_NEEDS[cap]}")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("already running under an ISA cap")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=cap)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not capped_onednn_isa and not cuda"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    out = _run_verbose("auto", {"ONEDNN_MAX_CPU_ISA": cap})
    impls = [ln.split(",")[6] for ln in _exec_lines(out)]
    assert impls and not any("amx" in i for i in impls), impls
    assert "EXACT True" in out, out


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 30, 33), (17, 384, 1536), (256, 768, 3072)])
@pytest.mark.parametrize("fuse_gelu", [False, True])
def test_cuda_matches_reference(shape, fuse_gelu):
    m, k, n = shape
    x, x_scale, w_q, w_scale, b = _make((m,), k, n, "cuda")
    x, w_q, w_scale, b = x.cuda(), w_q.cuda(), w_scale.cuda(), b.cuda()
    acc = K.int8_matmul_int32(K.quantize_per_tensor_symmetric(x, x_scale), w_q, "cuda")
    x_q = K.quantize_per_tensor_symmetric(x, x_scale)
    assert torch.equal(acc.cpu().long(), x_q.cpu().long() @ w_q.cpu().long().T)
    packed = K.pack_weight(w_q, w_scale, b, "cuda")
    K.reset_kernel_counters()
    y = K.int8_linear(x, x_scale, packed, fuse_gelu=fuse_gelu)
    assert K.kernel_counters() == {K.KERNEL_COUNTER["cuda"]: 1}
    ref = K.int8_linear_reference(x_q, x_scale, w_q, w_scale, b, fuse_gelu=fuse_gelu)
    _assert_close(y, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_and_module():
    assert K.resolve_backend("auto", "cuda") == "cuda"
    lin = torch.nn.Linear(64, 48).cuda()
    x = torch.randn(4, 5, 64, device="cuda")
    mod = K.Int8Linear.from_float(lin, float(x.abs().max()) / 127, backend="auto")
    assert mod.backend == "cuda" and mod(x).shape == (4, 5, 48)


# ----------------------------------------------------------------------------- INT8 attention matmuls


@pytest.mark.parametrize("s,t,dh", [(1, 1, 8), (9, 13, 16), (25, 25, 32), (4, 512, 64)])
def test_int8_attention_matmuls_accumulate_exactly_and_match_the_int64_reference(s, t, dh):
    """The fp32 matmul on integer grids equals the int64 reference bit for bit (no rounding of the
    sums), and the float results are the accumulators times the scales."""
    from ltp_compress.kernels import attention_matmuls_reference, int8_attention_context, int8_attention_scores
    from ltp_compress.kernels.attention_int8 import quantize_probs_grid, quantize_symmetric_grid

    g = torch.Generator().manual_seed(s * 1000 + t)
    q, k, v = (torch.randn(2, 3, n, dh, generator=g) * 3 for n in (s, t, t))
    p = torch.softmax(torch.randn(2, 3, s, t, generator=g) * 4, dim=-1)
    qs, ks, vs = (float(x.abs().max()) / 127 for x in (q, k, v))
    acc_s, acc_c, ref_scores, ref_context = attention_matmuls_reference(q, k, p, v, qs, ks, vs)
    fast_acc_s = torch.matmul(quantize_symmetric_grid(q, qs), quantize_symmetric_grid(k, ks).transpose(-1, -2))
    fast_acc_c = torch.matmul(quantize_probs_grid(p), quantize_symmetric_grid(v, vs))
    assert torch.equal(fast_acc_s.to(torch.int64), acc_s) and torch.equal(fast_acc_c.to(torch.int64), acc_c)
    assert torch.equal(fast_acc_s, fast_acc_s.round()) and int(acc_s.abs().max()) > 1000  # integers, not a trivial case
    K.reset_kernel_counters()
    scores, context = int8_attention_scores(q, k, qs, ks), int8_attention_context(p, v, vs)
    assert K.kernel_counters() == {"attention_int8_fp32_exact": 2}
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=0)
    torch.testing.assert_close(context, ref_context, rtol=1e-6, atol=1e-9)
    # and the 8-bit grids really changed the products (the test is not vacuous), within a grid step
    exact = torch.matmul(q, k.transpose(-1, -2))
    assert 0 < float((scores - exact).abs().max()) <= dh * (qs * float(k.abs().max()) + ks * float(q.abs().max()))


def test_int8_attention_refuses_sums_beyond_exact_float32_and_reduced_precision():
    from ltp_compress.kernels import int8_attention_context, int8_attention_scores

    with pytest.raises(ValueError, match="2\\^24"):
        int8_attention_context(torch.rand(1, 1, 2, 600), torch.randn(1, 1, 600, 4), 0.1)
    with pytest.raises(ValueError, match="2\\^24"):
        int8_attention_scores(torch.randn(1, 1, 2, 1100), torch.randn(1, 1, 2, 1100), 0.1, 0.1)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with pytest.raises(RuntimeError, match="highest"):
            int8_attention_scores(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), 0.1, 0.1)
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int8_attention_matmuls_are_exact_and_refuse_tf32():
    """On CUDA the float32 matmul of the integer grids must equal the exact reference too (no TF32)."""
    from ltp_compress.kernels import attention_matmuls_reference, int8_attention_context, int8_attention_scores
    from ltp_compress.kernels.attention_int8 import quantize_probs_grid, quantize_symmetric_grid

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 12, 128, 64, generator=g).cuda() * 3 for _ in range(3))
    p = torch.softmax(torch.randn(4, 12, 128, 128, generator=g).cuda() * 4, dim=-1)
    qs, ks, vs = (float(x.abs().max()) / 127 for x in (q, k, v))
    acc_s, acc_c, ref_s, ref_c = attention_matmuls_reference(q, k, p, v, qs, ks, vs)
    fast_s = torch.matmul(quantize_symmetric_grid(q, qs), quantize_symmetric_grid(k, ks).transpose(-1, -2))
    fast_c = torch.matmul(quantize_probs_grid(p), quantize_symmetric_grid(v, vs))
    assert torch.equal(fast_s.long(), acc_s) and torch.equal(fast_c.long(), acc_c)
    torch.testing.assert_close(int8_attention_scores(q, k, qs, ks), ref_s, rtol=1e-6, atol=0)
    torch.testing.assert_close(int8_attention_context(p, v, vs), ref_c, rtol=1e-6, atol=1e-9)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with pytest.raises(RuntimeError, match="TF32|highest|reduced"):
            int8_attention_scores(q, k, qs, ks)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
