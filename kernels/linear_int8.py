"""Static symmetric INT8 linear layers (W8A8, int32 accumulation) with selectable backends.

Math (all backends):
    x_q = clamp(round_half_even(x / x_scale), act_qmin, 127)        # int8, per-tensor scale
    w_q = clamp(round_half_even(w / w_scale[n]), -qmax, qmax)        # int8, per-output-channel
    acc[m, n] = sum_k x_q[m, k] * w_q[n, k]                          # exact int32
    y[m, n] = acc[m, n] * x_scale * w_scale[n] + bias[n]   (then optionally exact erf-GELU)

The activation range is a property of the checkpoint (`ACTIVATION_RANGES`): 'symmetric'
[-127, 127] (act_qmin -127, the first checkpoints' convention) or 'full' [-128, 127] (act_qmin
-128: the saturating range of ONNX QuantizeLinear and of a uint8 source with zero-point 128, so an
export needs no clamp before each quantisation). The scale is symmetric either way (zero-point 0,
x_scale = a / 127); 'full' only lets values in [-128.5, -127.5) x_scale keep -128 instead of -127.

Backends (pick one with :func:`resolve_backend`, once, outside the hot path):

* ``reference`` — plain torch. int32 accumulation via ``x_q.int() @ w_q.int().T`` (exact; the
  int32 matmul is a naive ATen loop, slow), epilogue in float64 then cast to float32.
* ``cpu_vnni`` — oneDNN through ``torch.ops.onednn.qlinear_prepack`` /
  ``torch.ops.onednn.qlinear_pointwise`` (the op Inductor's X86InductorQuantizer lowers to).
  The symmetric int8 activation is fed as **uint8 with zero-point 128** (``x_q + 128``): oneDNN
  runs signed-int8 sources through its slow ``ref_int8:any`` reference kernel, whereas u8 x s8
  hits a ``brg_matmul`` VNNI kernel (vpdpbusd; benchmarks/results/design_observations.md), or
  its AMX tile kernel where the CPU has amx_int8. oneDNN subtracts the zero-point contribution
  (128 * sum_k w[n, k]), applies x_scale * w_scale[n], bias, and the optional ``gelu_erf``
  post-op inside the kernel, writing fp32. The subtraction is exact on AVX-512 VNNI (int32
  compensation) but done in fp32 on AMX, so the accumulator is exact only while every
  intermediate (<= 255 * qmax * K in magnitude) fits fp32's 24-bit mantissa, i.e. K <= 518 for
  8-bit weights; above it the error is a few units of the accumulator (tests/test_kernels.py
  states the bound). The raw int32 paths (``reference``, ``cpu_int_mm``) are exact at any K.
  Weights: int8 in [-127, 127].
* ``cpu_avx2`` — the same oneDNN op, but weights quantised to 7 bits ([-63, 63],
  "reduce_range"). Without VNNI, oneDNN's u8 x s8 kernels use vpmaddubsw, which adds two
  u8*s8 products into a saturating int16; with |w| <= 63 and u8 <= 255 the pair sum is at most
  2*255*63 = 32130 < 32767, so the accumulation stays exact. On a VNNI machine this backend
  still runs the VNNI kernel (only the 7-bit weight quantisation is emulated), unless the
  process is started with ``ONEDNN_MAX_CPU_ISA=AVX2``, in which case oneDNN really uses its
  AVX2 ``gemm:jit`` kernel (the tests do this in a subprocess and check 7-bit weights are
  exact there; 8-bit weights would saturate the int16 pair sums).
* ``cpu_int_mm`` — ``torch._int_mm`` (s8 x s8 -> s32; on CPU it is oneDNN's s8s8s32 gemm, no
  shape constraints) exposing the raw int32 accumulators, then a torch epilogue
  (``addcmul`` for scale+bias, ``F.gelu``). The s8s8 gemm is also built on vpmaddubsw-style
  kernels on non-VNNI CPUs, where it is exact only with 7-bit weights, so weights are quantised
  to [-63, 63] there (see :func:`weight_qmax`).
* ``cuda`` — ``torch._int_mm`` on CUDA (cuBLASLt int8 tensor cores; needs M > 16 and K, N
  multiples of 8 — inputs are zero-padded to satisfy this, padding never changes the result)
  plus a torch epilogue. Untested here (no GPU on the development machine).
* ``auto`` — CPU: cpu_vnni if VNNI, else cpu_avx2 if AVX2, else reference; CUDA: cuda.

Every executed kernel increments a counter (:func:`kernel_counters`) so tests can assert which
kernel really ran (a silent fallback cannot pass).
"""

from __future__ import annotations

import collections
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import ACTIVATION_RANGES, BACKENDS, QMAX

_CPU_BACKENDS = ("reference", "cpu_vnni", "cpu_avx2", "cpu_int_mm")

QMAX_7BIT = 63  # reduce_range weights for non-VNNI u8 x s8 kernels

# ----------------------------------------------------------------------------- kernel counters

_COUNTERS: collections.Counter = collections.Counter()

#: concrete backend -> the name its GEMM kernel counts under in `kernel_counters` (the one owner)
KERNEL_COUNTER = {
    "reference": "reference",  # plain-torch int32 reference
    "cpu_vnni": "onednn_qlinear_u8s8",  # oneDNN u8 x s8 qlinear, full 8-bit weights
    "cpu_avx2": "onednn_qlinear_u8s8_w7",  # the same with 7-bit weights (no VNNI: exact only below 2^15)
    "cpu_int_mm": "int_mm_s8s8",  # torch._int_mm on the CPU
    "cuda": "cuda_int_mm",  # torch._int_mm (cuBLASLt) on CUDA
}


def kernel_counters() -> dict[str, int]:
    """Calls per concrete kernel actually executed since the last reset, e.g.
    ``{'onednn_qlinear_u8s8': 3}``; the names per backend are KERNEL_COUNTER's values."""
    return dict(_COUNTERS)


def reset_kernel_counters() -> None:
    _COUNTERS.clear()


def _count(name: str) -> None:
    _COUNTERS[name] += 1


# ----------------------------------------------------------------------------- ISA detection

# oneDNN's ONEDNN_MAX_CPU_ISA values, low to high; used to honour a cap set for the process.
_ONEDNN_ISA_ORDER = (
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL", "DEFAULT",
)


def _read_cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_isa() -> dict:
    """CPU int8-relevant ISA features, detected on first call (cached; never at import).

    Source: /proc/cpuinfo flags; if unavailable, ``torch.backends.cpu.get_cpu_capability()``
    (which cannot see VNNI, so avx512_vnni is then reported False). A cap set with
    ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) is honoured, because oneDNN honours it too.
    Returns ``{"avx2", "avx512", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile", "vnni",
    "source", "onednn_max_cpu_isa"}``; ``vnni`` = any VNNI flavour (avx512_vnni or avx_vnni or amx_int8);
    the AMX flags are False under a cap without AMX.
    """
    flags = _read_cpu_flags()
    if flags is not None:
        isa = {
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags and "avx512bw" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags,
            "amx_int8": "amx_int8" in flags,
            "amx_bf16": "amx_bf16" in flags,
            "amx_tile": "amx_tile" in flags,
            "source": "/proc/cpuinfo",
        }
    else:
        cap = torch.backends.cpu.get_cpu_capability()  # 'DEFAULT' | 'AVX2' | 'AVX512' | ...
        isa = {
            "avx2": cap in ("AVX2", "AVX512"),
            "avx512": cap == "AVX512",
            "avx512_vnni": False,
            "avx_vnni": False,
            "amx_int8": False,
            "amx_bf16": False,
            "amx_tile": False,
            "source": f"torch.backends.cpu.get_cpu_capability()={cap}",
        }
    cap_env = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    isa["onednn_max_cpu_isa"] = cap_env or None
    if cap_env in _ONEDNN_ISA_ORDER and cap_env not in ("ALL", "DEFAULT"):
        level = _ONEDNN_ISA_ORDER.index(cap_env)
        if level < _ONEDNN_ISA_ORDER.index("AVX2"):
            isa["avx2"] = False
        if level < _ONEDNN_ISA_ORDER.index("AVX2_VNNI"):
            isa["avx_vnni"] = False
        if level < _ONEDNN_ISA_ORDER.index("AVX512_CORE"):
            isa["avx512"] = False
        if level < _ONEDNN_ISA_ORDER.index("AVX512_CORE_VNNI") or cap_env.startswith("AVX2"):
            isa["avx512_vnni"] = False
        if "AMX" not in cap_env:
            isa["amx_int8"] = isa["amx_bf16"] = isa["amx_tile"] = False
    isa["vnni"] = isa["avx512_vnni"] or isa["avx_vnni"] or isa["amx_int8"]
    return isa


# ----------------------------------------------------------------------------- backend choice


def _onednn_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops, "onednn")
        and hasattr(torch.ops.onednn, "qlinear_pointwise")
        and hasattr(torch.ops.onednn, "qlinear_prepack")
    )


def backend_unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """None if concrete backend ``name`` can run on ``device`` here, else why not."""
    dev = torch.device(device)
    if name not in BACKENDS or name == "auto":
        return f"unknown concrete backend {name!r}; choose from {BACKENDS[1:]}"
    if name == "cuda":
        if dev.type != "cuda":
            return f"backend 'cuda' needs a CUDA device, got device {dev}"
        if not torch.cuda.is_available():
            return "backend 'cuda' requested but torch.cuda.is_available() is False"
        return None
    if dev.type != "cpu":
        return f"backend {name!r} runs on CPU only, got device {dev}"
    if name == "reference":
        return None
    isa = cpu_isa()
    if name == "cpu_vnni":
        if not _onednn_available():
            return "backend 'cpu_vnni' needs oneDNN (torch.ops.onednn.qlinear_pointwise) in this torch build"
        if not isa["vnni"]:
            return f"backend 'cpu_vnni' needs a CPU with AVX512-VNNI/AVX-VNNI/AMX; detected {isa}"
        return None
    if name == "cpu_avx2":
        if not _onednn_available():
            return "backend 'cpu_avx2' needs oneDNN (torch.ops.onednn.qlinear_pointwise) in this torch build"
        if not isa["avx2"]:
            return f"backend 'cpu_avx2' needs a CPU with AVX2; detected {isa}"
        return None
    if name == "cpu_int_mm":
        if not hasattr(torch, "_int_mm"):
            return "backend 'cpu_int_mm' needs torch._int_mm"
        return None
    return f"unhandled backend {name!r}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on ``device`` here."""
    return [b for b in BACKENDS[1:] if backend_unavailable_reason(b, device) is None]


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """Map ``name`` to a concrete backend for ``device``; call once, outside the hot path.

    'auto' -> CPU: cpu_vnni if VNNI else cpu_avx2 if AVX2 else reference; CUDA: cuda.
    A concrete name that cannot run here raises RuntimeError (never a silent fallback).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown int8 backend {name!r}; choose from {BACKENDS}")
    dev = torch.device(device)
    if name == "auto":
        if dev.type == "cuda":
            candidates = ("cuda",)
        elif dev.type == "cpu":
            candidates = ("cpu_vnni", "cpu_avx2", "reference")
        else:
            raise RuntimeError(f"no int8 backend for device {dev}")
        for c in candidates:
            if backend_unavailable_reason(c, dev) is None:
                return c
        raise RuntimeError(f"no int8 backend available for device {dev}")
    reason = backend_unavailable_reason(name, dev)
    if reason is not None:
        raise RuntimeError(f"int8 backend {name!r} is not available: {reason}")
    return name


def weight_qmax(backend: str) -> int:
    """Largest |w_q| a concrete backend accumulates exactly: 63 for cpu_avx2 (and for
    cpu_int_mm on a CPU without VNNI), 127 otherwise."""
    if backend == "cpu_avx2":
        return QMAX_7BIT
    if backend == "cpu_int_mm" and not cpu_isa()["vnni"]:
        return QMAX_7BIT
    return QMAX


# ----------------------------------------------------------------------------- quantisation


def quantize_per_channel_symmetric(w: Tensor, qmax: int = QMAX) -> tuple[Tensor, Tensor]:
    """w [N, K] float -> (w_q int8 [N, K] in [-qmax, qmax], w_scale float32 [N]).

    scale[n] = max_k |w[n, k]| / qmax (an all-zero row gets scale 1.0); rounding half-to-even.
    Round-trip error |w - w_q * scale| <= scale / 2 per channel (up to fp32 rounding).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a [N, K] weight, got shape {tuple(w.shape)}")
    w32 = w.detach().to(torch.float32)
    scale = w32.abs().amax(dim=1) / qmax  # [N]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    w_q = torch.round(w32 / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)  # [N, K]
    return w_q, scale


def act_qmin_of(activation_range: str) -> int:
    """'symmetric' -> -127, 'full' -> -128; anything else is an error naming the known ranges."""
    try:
        return ACTIVATION_RANGES[activation_range]
    except (KeyError, TypeError):
        raise ValueError(f"activation range {activation_range!r}: expected one of {sorted(ACTIVATION_RANGES)}") from None


def quantize_per_tensor_symmetric(x: Tensor, scale: float | Tensor, act_qmin: int = -QMAX) -> Tensor:
    """x float (any shape) -> int8 = clamp(round_half_even(x / scale), act_qmin, 127).

    The division is IEEE fp32 division on every device: CUDA turns a division by a CPU scalar
    into a multiplication by its reciprocal, which rounds differently near .5 (seen on an H200:
    single-step flips against the CPU reference), so there the scale is a device tensor."""
    if x.device.type != "cpu" and not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    return torch.round(x / scale).clamp_(act_qmin, QMAX).to(torch.int8)


# 1.5 * 2^23: adding it to a float32 v with |v| < 2^22 rounds v to an integer half-to-even
# (the sum's ulp is 1) and leaves that integer in the low mantissa bits of the sum.
_MAGIC = 12582912.0


def _quantize_fast(x: Tensor, scale: float, zero_point: int, dtype: torch.dtype, act_qmin: int = -QMAX) -> Tensor:
    """Hot-path quantiser, bit-identical to ``quantize_per_tensor_symmetric(x, scale, act_qmin) +
    zero_point`` (tested) in about a quarter of the time on CPU.

    v = clamp(x / scale, act_qmin, 127) (same fp32 division as the reference, and clamping to
    integer bounds commutes with rounding); v + (1.5 * 2^23 + zero_point) is rounded half-to-even
    by the fp32 add itself; the int32 view of the sum then holds the result in its low byte,
    and the int32 -> (u)int8 conversion keeps exactly that byte (it wraps modulo 256).
    Three cheap passes instead of round + clamp + float->int8 (float->int8 is slow in ATen).
    """
    if x.dtype != torch.float32 or x.device.type != "cpu":
        q = quantize_per_tensor_symmetric(x.float(), scale, act_qmin)
        return q if zero_point == 0 and dtype == torch.int8 else (q.to(torch.int16) + zero_point).to(dtype)
    v = torch.div(x, scale)  # [M, K] fp32, new buffer
    v.clamp_(act_qmin, QMAX).add_(_MAGIC + zero_point)
    return v.view(torch.int32).to(dtype)


def quantize_u8_zp128(x: Tensor, scale: float, act_qmin: int = -QMAX) -> Tensor:
    """quantize_per_tensor_symmetric(x, scale, act_qmin) + 128 as uint8 in [act_qmin + 128, 255]
    (oneDNN source)."""
    return _quantize_fast(x, scale, 128, torch.uint8, act_qmin)


# ----------------------------------------------------------------------------- reference


def _as_float(s: float | Tensor) -> float:
    return float(s.item()) if isinstance(s, Tensor) else float(s)


def int8_linear_reference(
    x_q: Tensor,  # int8 [M, K] (or [..., K])
    x_scale: float | Tensor,
    w_q: Tensor,  # int8 [N, K]
    w_scale: Tensor,  # float32 [N]
    bias: Tensor | None,  # float32 [N]
    fuse_gelu: bool = False,
) -> Tensor:  # float32 [M, N] (or [..., N])
    """Plain-torch exact reference: int32 accumulation, float64 epilogue, float32 result."""
    _count(KERNEL_COUNTER["reference"])
    lead = x_q.shape[:-1]
    acc = _int32_matmul_reference(x_q.reshape(-1, x_q.shape[-1]), w_q)  # [M, N] int32
    y = acc.to(torch.float64) * (_as_float(x_scale) * w_scale.to(torch.float64))  # [M, N]
    if bias is not None:
        y = y + bias.to(torch.float64)
    if fuse_gelu:
        y = F.gelu(y)  # exact erf GELU
    return y.to(torch.float32).reshape(*lead, w_q.shape[0])


def _int32_matmul_reference(x_q: Tensor, w_q: Tensor) -> Tensor:
    """[M, K] int8 x [N, K] int8 -> [M, N] int32, exact. CPU: int32 matmul (naive ATen
    loop, no overflow since |acc| <= K * 127^2 < 2^31 for K < 133k). CUDA has no integer
    matmul, so float64 is used there (exact while |acc| < 2^53)."""
    if x_q.device.type == "cuda":
        # integer matmul is not implemented on CUDA; float64 is exact for |acc| < 2^53
        return (x_q.to(torch.float64) @ w_q.to(torch.float64).T).to(torch.int32)
    return x_q.to(torch.int32) @ w_q.to(torch.int32).T


# ----------------------------------------------------------------------------- packed weights


@dataclass
class PackedInt8Weight:
    """A weight prepared once for one concrete backend.

    w_q [N, K] int8 and w_scale [N] / bias [N] float32 are kept as given (the reference view);
    ``packed`` is backend-specific: oneDNN blocked weight (cpu_vnni / cpu_avx2), w_q^T [K, N]
    contiguous (cpu_int_mm), w_q zero-padded to [N8, K8] (cuda; passed as its .t() view).
    """

    backend: str
    in_features: int  # K
    out_features: int  # N
    w_q: Tensor  # [N, K] int8
    w_scale: Tensor  # [N] float32
    bias: Tensor | None  # [N] float32
    packed: Tensor
    w_zero_point: Tensor | None = None  # [N] int32 zeros (oneDNN)
    k_pad: int = 0  # cuda: zero columns appended to K
    n_pad: int = 0  # cuda: zero rows appended to N

    @property
    def device(self) -> torch.device:
        return self.w_q.device


def pack_weight(w_q: Tensor, w_scale: Tensor, bias: Tensor | None, backend: str) -> PackedInt8Weight:
    """Prepack an int8 weight [N, K] (+ per-channel scales [N], optional bias [N]) for
    ``backend`` ('auto' is resolved here for w_q's device). Raises if w_q exceeds the backend's
    exact range (:func:`weight_qmax`, e.g. [-63, 63] for cpu_avx2)."""
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise ValueError(f"w_q must be int8 [N, K], got {w_q.dtype} {tuple(w_q.shape)}")
    backend = resolve_backend(backend, w_q.device)
    n, k = w_q.shape
    w_scale = w_scale.detach().to(device=w_q.device, dtype=torch.float32).reshape(n).contiguous()
    if bias is not None:
        bias = bias.detach().to(device=w_q.device, dtype=torch.float32).reshape(n).contiguous()
    w_q = w_q.detach().contiguous()
    qmax = weight_qmax(backend)
    if qmax < QMAX and w_q.numel() and int(w_q.abs().max()) > qmax:
        raise ValueError(
            f"backend {backend!r} accumulates exactly only with weights in [-{qmax}, {qmax}] "
            f"(u8*s8 int16 pair saturation without VNNI); quantise with "
            f"quantize_per_channel_symmetric(w, qmax=weight_qmax({backend!r}))"
        )
    common = dict(backend=backend, in_features=k, out_features=n, w_q=w_q, w_scale=w_scale, bias=bias)
    if backend in ("cpu_vnni", "cpu_avx2"):
        packed = torch.ops.onednn.qlinear_prepack(w_q, None)  # oneDNN blocked s8 weight
        zp = torch.zeros(n, dtype=torch.int32)
        return PackedInt8Weight(packed=packed, w_zero_point=zp, **common)
    if backend == "cpu_int_mm":
        return PackedInt8Weight(packed=w_q.t().contiguous(), **common)  # [K, N]
    if backend == "cuda":
        k_pad, n_pad = (-k) % 8, (-n) % 8
        wp = F.pad(w_q, (0, k_pad, 0, n_pad)) if (k_pad or n_pad) else w_q  # [N8, K8]
        return PackedInt8Weight(packed=wp.contiguous(), k_pad=k_pad, n_pad=n_pad, **common)
    return PackedInt8Weight(packed=w_q, **common)  # reference


# ----------------------------------------------------------------------------- int32 GEMM


def int8_matmul_int32(x_q: Tensor, w_q: Tensor, backend: str) -> Tensor:
    """Raw int32 accumulators: x_q int8 [M, K] x w_q int8 [N, K] -> int32 [M, N].

    Exposed for 'reference', 'cpu_int_mm' (torch._int_mm) and 'cuda' (torch._int_mm,
    padded to its shape constraints). The oneDNN backends (cpu_vnni / cpu_avx2) only produce a
    dequantised fp32 output, so they raise NotImplementedError here.
    """
    backend = resolve_backend(backend, x_q.device)
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise ValueError("int8_matmul_int32 expects int8 inputs")
    if backend == "reference":
        _count(KERNEL_COUNTER["reference"])
        return _int32_matmul_reference(x_q, w_q)
    if backend == "cpu_int_mm":
        _count(KERNEL_COUNTER["cpu_int_mm"])
        return torch._int_mm(x_q.contiguous(), w_q.t().contiguous())  # [M,K] x [K,N]
    if backend == "cuda":
        n, k = w_q.shape
        k_pad, n_pad = (-k) % 8, (-n) % 8
        wp = F.pad(w_q, (0, k_pad, 0, n_pad)) if (k_pad or n_pad) else w_q.contiguous()
        return _cuda_int_mm(x_q, wp, k_pad)[:, :n]
    raise NotImplementedError(
        f"backend {backend!r} (oneDNN qlinear) has no int32 output; use 'cpu_int_mm' or 'reference'"
    )


def _cuda_int_mm(x_q: Tensor, w_padded: Tensor, k_pad: int) -> Tensor:
    """cuBLASLt int8 GEMM: x_q [M, K] int8, w_padded [N8, K8] int8 -> int32 [M, N8].
    torch._int_mm on CUDA needs M > 16 and K, N multiples of 8: zero-pad K (zeros add nothing)
    and M (extra rows are sliced off)."""
    _count(KERNEL_COUNTER["cuda"])
    m = x_q.shape[0]
    m_pad = 17 - m if m <= 16 else 0
    if k_pad or m_pad:
        x_q = F.pad(x_q, (0, k_pad, 0, m_pad))
    acc = torch._int_mm(x_q.contiguous(), w_padded.t())  # [M', N8], w^T as a column-major view
    return acc[:m] if m_pad else acc


# ----------------------------------------------------------------------------- hot path


def _epilogue(acc: Tensor, x_scale: float, packed: PackedInt8Weight, fuse_gelu: bool) -> Tensor:
    """acc int32 [M, N] -> float32 [M, N]: acc * (x_scale * w_scale) + bias, optional GELU."""
    scale = packed.w_scale * x_scale  # [N]
    y = acc.to(torch.float32)
    if packed.bias is not None:
        y = torch.addcmul(packed.bias, y, scale)
    else:
        y.mul_(scale)
    return F.gelu(y) if fuse_gelu else y


def onednn_qlinear_u8(x_u8: Tensor, x_scale: float, packed: PackedInt8Weight, fuse_gelu: bool = False) -> Tensor:
    """oneDNN u8 x s8 linear on an already quantised activation: x_u8 = x_q + 128 [M, K] uint8
    (zero-point 128), weights prepacked by `pack_weight` (cpu_vnni / cpu_avx2). Returns float32
    [M, N] = (x_u8 - 128) @ w_q^T * x_scale * w_scale + bias [, exact erf GELU]. The one place
    that spells out the op's argument list (benchmarks call this too)."""
    return torch.ops.onednn.qlinear_pointwise(
        x_u8, x_scale, 128,
        packed.packed, packed.w_scale, packed.w_zero_point, packed.bias,
        1.0, 0, torch.float32,  # output scale / zero-point ignored for fp32 output
        "gelu" if fuse_gelu else "none", [], "none" if fuse_gelu else "",  # 'none' = erf GELU
    )


def int8_linear(x: Tensor, x_scale: float, packed: PackedInt8Weight, fuse_gelu: bool = False,
                act_qmin: int = -QMAX) -> Tensor:
    """y = dequant(quant(x) @ w_q^T) + bias [, GELU]; x float [..., K] -> float32 [..., N].

    Quantises x itself (per-tensor, ``x_scale``, to [act_qmin, 127]) and runs ``packed.backend``.
    The backend was chosen when the weight was packed; nothing is probed here.
    """
    k = packed.in_features
    if x.shape[-1] != k:
        raise ValueError(f"expected last dim {k}, got input shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        x = x.float()  # activations are quantised from fp32
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    backend = packed.backend
    x_scale = float(x_scale)
    if backend in ("cpu_vnni", "cpu_avx2"):
        _count(KERNEL_COUNTER[backend])
        y = onednn_qlinear_u8(quantize_u8_zp128(x2, x_scale, act_qmin), x_scale, packed, fuse_gelu)  # [M, N] float32
    elif backend == "cpu_int_mm":
        _count(KERNEL_COUNTER["cpu_int_mm"])
        x_q = _quantize_fast(x2, x_scale, 0, torch.int8, act_qmin)  # [M, K] int8
        y = _epilogue(torch._int_mm(x_q, packed.packed), x_scale, packed, fuse_gelu)
    elif backend == "cuda":
        x_q = quantize_per_tensor_symmetric(x2, x_scale, act_qmin)  # [M, K] int8
        acc = _cuda_int_mm(x_q, packed.packed, packed.k_pad)  # [M, N8]
        if packed.n_pad:
            acc = acc[:, : packed.out_features]
        y = _epilogue(acc, x_scale, packed, fuse_gelu)
    elif backend == "reference":
        x_q = quantize_per_tensor_symmetric(x2, x_scale, act_qmin)
        y = int8_linear_reference(x_q, x_scale, packed.w_q, packed.w_scale, packed.bias, fuse_gelu)
    else:  # pragma: no cover
        raise RuntimeError(f"unknown backend {backend!r}")
    return y.reshape(*lead, packed.out_features)


# ----------------------------------------------------------------------------- module


class Int8Linear(nn.Module):
    """Drop-in W8A8 replacement for ``nn.Linear`` with a static activation scale.

    Buffers: w_q int8 [N, K], w_scale float32 [N], bias float32 [N] (optional), x_scale float32
    scalar. ``act_qmin``: the activation range's lower bound (-127 or -128, ``ACTIVATION_RANGES``;
    a checkpoint records it in ltp.json). ``backend`` is a concrete backend name resolved at construction; the prepacked
    weight is built on first forward and rebuilt after ``.to()`` / ``load_state_dict``.
    """

    def __init__(
        self,
        w_q: Tensor,
        w_scale: Tensor,
        bias: Tensor | None,
        x_scale: float,
        backend: str = "auto",
        fuse_gelu: bool = False,
        act_qmin: int = -QMAX,
    ):
        super().__init__()
        if act_qmin not in ACTIVATION_RANGES.values():
            raise ValueError(f"act_qmin {act_qmin!r}: expected one of {sorted(ACTIVATION_RANGES.values())}")
        self.act_qmin = int(act_qmin)
        self.backend = resolve_backend(backend, w_q.device)
        self.in_features = int(w_q.shape[1])
        self.out_features = int(w_q.shape[0])
        self.fuse_gelu = fuse_gelu
        self.register_buffer("w_q", w_q.detach().to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.detach().to(torch.float32).reshape(-1).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.register_buffer("x_scale", torch.tensor(float(x_scale), dtype=torch.float32))
        self._packed: PackedInt8Weight | None = None
        self._x_scale_f: float | None = None

    @classmethod
    def from_float(
        cls, linear: nn.Linear, x_scale: float, backend: str = "auto", fuse_gelu: bool = False, act_qmin: int = -QMAX
    ) -> "Int8Linear":
        """Quantise ``linear.weight`` per output channel with the backend's exact range
        (127, or 63 for cpu_avx2) and wrap it. ``x_scale`` is the calibrated activation scale."""
        w = linear.weight.detach()
        concrete = resolve_backend(backend, w.device)
        w_q, w_scale = quantize_per_channel_symmetric(w, qmax=weight_qmax(concrete))
        b = None if linear.bias is None else linear.bias.detach()
        return cls(w_q, w_scale, b, x_scale, backend=concrete, fuse_gelu=fuse_gelu, act_qmin=act_qmin)

    def _invalidate(self) -> None:
        self._packed = None
        self._x_scale_f = None

    def _apply(self, fn, *args, **kwargs):
        self._invalidate()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def packed_weight(self) -> PackedInt8Weight:
        if self._packed is None:
            self._packed = pack_weight(self.w_q, self.w_scale, self.bias, self.backend)
            self._x_scale_f = float(self.x_scale)
        return self._packed

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N] float32
        packed = self._packed if self._packed is not None else self.packed_weight()
        return int8_linear(x, self._x_scale_f, packed, fuse_gelu=self.fuse_gelu, act_qmin=self.act_qmin)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.backend}, "
            f"x_scale={float(self.x_scale):.6g}, act_range=[{self.act_qmin}, {QMAX}], fuse_gelu={self.fuse_gelu}"
        )
