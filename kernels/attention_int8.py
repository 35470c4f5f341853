"""INT8 attention matmuls: Q·Kᵀ and P·V on 8-bit integer grids with exact integer accumulation.

Math (static scales from calibration, like the INT8 Linears):
    q_q = clamp(round(q / q_scale), -127, 127)        # int8, one scale per layer
    k_q = clamp(round(k / k_scale), -127, 127)        # int8
    v_q = clamp(round(v / v_scale), -127, 127)        # int8
    p_q = round(p / (1/255))                          # uint8: softmax probabilities lie in [0, 1]
(every division is an IEEE float32 division by the float32 scale, as ONNX QuantizeLinear computes
it, so the exported graph quantises identically; round half to even)
    scores[i, j]  = (Σ_c q_q[i, c] · k_q[j, c]) · q_scale · k_scale
    context[i, c] = (Σ_j p_q[i, j] · v_q[j, c]) · v_scale / 255

Execution. PyTorch has no batched int8 matmul ([b, H, s, dh] operands) on CPU or CUDA, and one
`torch._int_mm` per (example, head) costs more than the products. The integer operands are
therefore held in float32 and multiplied by `torch.matmul`: every product and every partial sum is
an integer of magnitude below 2^24, which float32 represents exactly, so the accumulation is
exact (bit-equal to an int32/int64 accumulation, tested against :func:`attention_matmuls_reference`):
    Q·Kᵀ: |Σ| ≤ dh · 127 · 127     < 2^24 for dh ≤ 1040
    P·V:  |Σ| ≤ s · 255 · 127      < 2^24 for s ≤ 518 (BERT/RoBERTa positions: ≤ 514)
Both bounds are checked per call. Float32 matmuls must run at full precision (no TF32 or bf16
passes): the kernels refuse to run unless `torch.get_float32_matmul_precision()` is "highest" and,
on CUDA, `torch.backends.cuda.matmul.allow_tf32` is off.

This buys BOPs (the products are 8 x 8-bit; Kim et al. KDD'22 §5.3 count them that way), not
speed: the quantise steps add work and the matmul itself still runs in float32. What ran is
counted as "attention_int8_fp32_exact" in :func:`ltp_compress.kernels.kernel_counters`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backends import QMAX
from .linear_int8 import _count

#: softmax probabilities are quantised to uint8 with the fixed scale 1 / PROB_QMAX (p ∈ [0, 1])
PROB_QMAX = 255
#: float32 represents every integer of magnitude below this exactly
EXACT_FP32 = 1 << 24


def _check_exact(reduction: int, a_max: int, b_max: int, what: str) -> None:
    if reduction * a_max * b_max >= EXACT_FP32:
        raise ValueError(f"INT8 attention {what}: a reduction over {reduction} terms of |{a_max}·{b_max}| can reach "
                         f"{reduction * a_max * b_max} >= 2^24, beyond exact float32 accumulation")


def _check_device(t: Tensor) -> None:
    """Reduced-precision float32 matmuls (TF32, bf16 passes) would round the integer sums."""
    if torch.get_float32_matmul_precision() != "highest" or (t.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        raise RuntimeError("INT8 attention matmuls accumulate exactly in float32, which reduced-precision float32 matmuls "
                           "break: use torch.set_float32_matmul_precision('highest') and "
                           "torch.backends.cuda.matmul.allow_tf32 = False")


def quantize_symmetric_grid(x: Tensor, scale: float) -> Tensor:
    """clamp(round_half_even(x / scale), -127, 127) as float32 integers (any shape)."""
    return torch.round(x.float() / scale).clamp_(-QMAX, QMAX)


def quantize_probs_grid(p: Tensor) -> Tensor:
    """round_half_even(p / float32(1/255)) as float32 integers in [0, 255] (p: softmax probabilities)."""
    return torch.round(p.float() / (1.0 / PROB_QMAX)).clamp_(0, PROB_QMAX)


def int8_attention_scores(q: Tensor, k: Tensor, q_scale: float, k_scale: float, out_scale: float = 1.0) -> Tensor:
    """[b, H, s, dh] x [b, H, t, dh] -> [b, H, s, t] float32 = (q_q · k_qᵀ) · (q_scale · k_scale · out_scale)
    (`out_scale`: e.g. the attention's 1/√dh, applied in the same one multiplication)."""
    _check_exact(q.shape[-1], QMAX, QMAX, "Q·Kᵀ")
    _check_device(q)
    _count("attention_int8_fp32_exact")
    acc = torch.matmul(quantize_symmetric_grid(q, q_scale), quantize_symmetric_grid(k, k_scale).transpose(-1, -2))
    return acc * (q_scale * k_scale * out_scale)


def int8_attention_context(p: Tensor, v: Tensor, v_scale: float) -> Tensor:
    """[b, H, s, t] probabilities x [b, H, t, dh] -> [b, H, s, dh] float32 = (p_q · v_q) · v_scale / 255."""
    _check_exact(p.shape[-1], PROB_QMAX, QMAX, "P·V")
    _check_device(p)
    _count("attention_int8_fp32_exact")
    acc = torch.matmul(quantize_probs_grid(p), quantize_symmetric_grid(v, v_scale))
    return acc * (v_scale / PROB_QMAX)


@torch.no_grad()
def attention_matmuls_reference(q: Tensor, k: Tensor, p: Tensor, v: Tensor, q_scale: float, k_scale: float,
                                v_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Plain-torch reference: the same integer grids multiplied in int64 (exact by construction).
    Returns (Q·Kᵀ accumulators, P·V accumulators) as int64 and the float32 results."""
    qi = quantize_symmetric_grid(q, q_scale).to(torch.int64)
    ki = quantize_symmetric_grid(k, k_scale).to(torch.int64)
    pi = quantize_probs_grid(p).to(torch.int64)
    vi = quantize_symmetric_grid(v, v_scale).to(torch.int64)
    if q.device.type == "cuda":  # no integer matmul on CUDA: float64 is exact far beyond these sums
        acc_s = torch.matmul(qi.double(), ki.double().transpose(-1, -2)).to(torch.int64)
        acc_c = torch.matmul(pi.double(), vi.double()).to(torch.int64)
    else:
        acc_s = torch.matmul(qi, ki.transpose(-1, -2))
        acc_c = torch.matmul(pi, vi)
    scores = (acc_s.double() * (q_scale * k_scale)).float()
    context = (acc_c.double() * (v_scale / PROB_QMAX)).float()
    return acc_s, acc_c, scores, context


class Int8AttentionMatmuls(nn.Module):
    """Static scales of one layer's INT8 attention matmuls, attached to its self-attention module
    as `int8_matmuls` (the pruned runtime looks for it). Buffers (saved in the checkpoint):
    q_scale, k_scale, v_scale float32 scalars."""

    def __init__(self, q_scale: float, k_scale: float, v_scale: float):
        super().__init__()
        for name, value in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
            self.register_buffer(name, torch.tensor(float(value), dtype=torch.float32))
        self._floats: tuple[float, float, float] | None = None

    def _scales(self) -> tuple[float, float, float]:
        if self._floats is None:
            self._floats = (float(self.q_scale), float(self.k_scale), float(self.v_scale))
        return self._floats

    def _apply(self, fn, *args, **kwargs):
        self._floats = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._floats = None
        return super()._load_from_state_dict(*args, **kwargs)

    def scores(self, q: Tensor, k: Tensor, out_scale: float = 1.0) -> Tensor:  # [b, H, s, dh] x [b, H, t, dh] -> [b, H, s, t]
        qs, ks, _ = self._scales()
        return int8_attention_scores(q, k, qs, ks, out_scale)

    def context(self, p: Tensor, v: Tensor) -> Tensor:  # [b, H, s, t] x [b, H, t, dh] -> [b, H, s, dh]
        return int8_attention_context(p, v, self._scales()[2])

    def extra_repr(self) -> str:
        qs, ks, vs = self._scales()
        return f"q_scale={qs:.6g}, k_scale={ks:.6g}, v_scale={vs:.6g}, p_scale=1/{PROB_QMAX}"
