"""Static uniform symmetric INT8 (W8A8) for the Linear layers of a pruned BERT / RoBERTa classifier.

What is quantised
    Every ``nn.Linear`` of the model: Q/K/V projections, attention output projection, the two FFN
    matmuls of every encoder layer, the BERT pooler and the classifier (RoBERTa: head.dense and
    head.out_proj). Embeddings, LayerNorm, softmax, GELU (unless fused into the INT8 kernel's
    epilogue, which computes it in float) and residual adds stay float32.

    * weights: per output channel, symmetric, ``scale[n] = max_k |W[n, k]| / qmax`` (qmax = 127,
      or 63 for backends that only accumulate 7-bit weights exactly; see
      :func:`ltp_compress.kernels.weight_qmax`), round half to even;
    * input activations: one static scale per Linear, symmetric, ``x_scale = a / 127`` with ``a``
      from calibration: ``minmax`` (a = max |x| seen) or ``percentile`` (a = the p-th percentile
      of |x|, clipping rare outliers);
    * calibration runs training batches through the model's *own pruned runtime*
      (``forward_packed`` with the model's PruningConfig), so each Linear observes exactly the
      tokens that survive pruning in deployment (pruned tokens never reach later layers and so
      never widen the ranges).

The two attention matmuls (Q·Kᵀ and A·V)
    stay FP32 by default (``attention_matmuls: fp32``; counted at 32 x 32 bits). With
    ``attention_matmuls: int8`` they run on 8-bit grids with exact integer accumulation
    (:mod:`ltp_compress.kernels.attention_int8`): Q, K, V with static symmetric scales calibrated
    like the Linear inputs (:func:`calibrate_attention`, the outputs of the query/key/value
    projections), the softmax probabilities as uint8 with the fixed scale 1/255; counted at
    8 x 8 bits. Token scores for pruning are read off the float probabilities in both cases.
    Per-op bits: :func:`int8_precision`.

Two executable forms share the same scales:
    * :func:`convert_to_int8` — replaces each nn.Linear by :class:`ltp_compress.kernels.Int8Linear`
      (real int8 GEMMs with int32 accumulation through a backend chosen once, explicitly);
    * :func:`fake_quant_model` — replaces each nn.Linear by :class:`FakeQuantLinear` (same integer
      grid, float math): the reference the INT8 model is tested against.

Observers are small plain-torch classes (:class:`MinMaxObserver`, :class:`PercentileObserver`):
they must observe the packed ``[T, d]`` token matrices of the pruned runtime, accumulate over
batches of different lengths, and give ``max|x|/127`` exactly, which is simpler to guarantee (and
test) by hand than through torch.ao's deprecated observer stack.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ltp_compress.kernels import QMAX, Int8Linear, act_qmin_of, quantize_per_channel_symmetric, resolve_backend, weight_qmax

QUANT_FORMAT = "w8a8-symmetric-static"

# ----------------------------------------------------------------------------- observers


class MinMaxObserver:
    """Running max |x| over everything observed; scale = max|x| / 127."""

    def __init__(self):
        self.max_abs = 0.0
        self.count = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if x.numel():
            self.max_abs = max(self.max_abs, float(x.detach().abs().max()))
            self.count += x.numel()

    def amax(self) -> float:
        return self.max_abs

    def scale(self) -> float:
        a = self.amax()
        return a / QMAX if a > 0 else 1.0


class PercentileObserver(MinMaxObserver):
    """a = the `percentile`-th percentile of |x| over all observed values; scale = a / 127.

    Memory stays bounded: from each observed tensor at most `sample_per_call` values of |x| are
    kept (a uniform random subsample, seeded; all values when the tensor is smaller), and the
    percentile is taken over the union at the end. The exact running max is kept too, and the
    result never exceeds it."""

    def __init__(self, percentile: float = 99.99, sample_per_call: int = 1 << 16, seed: int = 0):
        super().__init__()
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile
        self.sample_per_call = sample_per_call
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        a = x.detach().abs().reshape(-1).float().cpu()
        if a.numel() > self.sample_per_call:
            idx = torch.randint(0, a.numel(), (self.sample_per_call,), generator=self._gen)
            a = a[idx]
        self._samples.append(a)

    def amax(self) -> float:
        if not self._samples:
            return 0.0
        if self.percentile >= 100:
            return self.max_abs
        v = torch.cat(self._samples)
        k = max(1, min(v.numel(), int(math.ceil(self.percentile / 100.0 * v.numel()))))
        return min(float(v.kthvalue(k).values), self.max_abs)


def make_observer(kind: str, percentile: float = 99.99):
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    raise ValueError(f"unknown observer {kind!r}; choose 'minmax' or 'percentile'")


# ----------------------------------------------------------------------------- calibration


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear in the model (encoder, pooler, classifier)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _run_calibration(model: nn.Module, batches, pruning, hooks: list, forward=None) -> None:
    """Run `batches` through the model's packed pruned runtime with `hooks` registered (removed after)."""
    from ltp_compress.modeling.pruned_encoder import forward_packed

    model.eval()
    device = next(model.parameters()).device
    try:
        for b in batches:
            if forward is not None:
                forward(model, b, pruning)
            else:
                forward_packed(model, b.input_ids.to(device), b.attention_mask.to(device),
                               None if b.token_type_ids is None else b.token_type_ids.to(device), pruning)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def calibrate(model: nn.Module, batches, pruning, observer: str = "minmax", percentile: float = 99.99,
              forward=None) -> dict[str, float]:
    """Activation scales {linear name: x_scale} from running `batches` (objects with input_ids,
    attention_mask, token_type_ids) through the model's packed pruned runtime."""
    names = linear_names(model)
    observers = {n: make_observer(observer, percentile) for n in names}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, args, _n=n: observers[_n].observe(args[0])) for n in names]
    _run_calibration(model, batches, pruning, hooks, forward)
    missing = [n for n in names if observers[n].count == 0]
    if missing:
        raise RuntimeError(f"calibration never reached these Linear layers: {missing}")
    return {n: observers[n].scale() for n in names}


def attention_names(model: nn.Module) -> list[str]:
    """Qualified names of every encoder layer's self-attention module (`...attention.self`), where
    INT8 attention matmuls attach."""
    return [n for n, _ in model.named_modules() if n.endswith("attention.self")]


#: operand of the INT8 attention matmuls -> the Linear (child of attention.self) whose output it is
ATTENTION_OPERANDS = {"q": "query", "k": "key", "v": "value"}


@torch.no_grad()
def calibrate_attention(model: nn.Module, batches, pruning, observer: str = "minmax", percentile: float = 99.99,
                        forward=None) -> dict[str, dict[str, float]]:
    """Static scales of the INT8 attention matmuls' activation operands, {attention.self name:
    {"q", "k", "v": scale}}, observed as the outputs of its query / key / value Linears on the
    tokens that reach them in the packed pruned runtime (padded key slots never enter: the
    projections run on packed [T, d] rows). The probabilities use the fixed scale 1/255."""
    observers = {(a, op): make_observer(observer, percentile) for a in attention_names(model) for op in ATTENTION_OPERANDS}
    hooks = []
    for (a, op), obs in observers.items():
        lin = model.get_submodule(f"{a}.{ATTENTION_OPERANDS[op]}")
        hooks.append(lin.register_forward_hook(lambda m, args, out, _o=obs: _o.observe(out)))
    _run_calibration(model, batches, pruning, hooks, forward)
    if not observers or any(o.count == 0 for o in observers.values()):
        raise RuntimeError("calibration never reached the query/key/value projections of every attention layer")
    return {a: {op: observers[(a, op)].scale() for op in ATTENTION_OPERANDS} for a in attention_names(model)}


def attach_int8_attention(model: nn.Module, attention_scales: dict[str, dict[str, float]]) -> None:
    """Give every listed self-attention module INT8 Q·Kᵀ and P·V (`int8_matmuls`, read by the
    pruned runtime) with these static scales."""
    from ltp_compress.kernels import Int8AttentionMatmuls

    device = next(model.parameters()).device
    for name, sc in attention_scales.items():
        model.get_submodule(name).int8_matmuls = Int8AttentionMatmuls(sc["q"], sc["k"], sc["v"]).to(device)


# ----------------------------------------------------------------------------- modules


def fake_quant_per_tensor(x: torch.Tensor, scale: float | torch.Tensor, qmax: int = QMAX,
                          qmin: int | None = None) -> torch.Tensor:
    """Symmetric-scale fake quantisation: clamp(round(x/s), qmin, qmax) * s (float result);
    qmin defaults to -qmax (the 'symmetric' range; -128 is the 'full' one, kernels/backends.py)."""
    return torch.round(x / scale).clamp(-qmax if qmin is None else qmin, qmax) * scale


def fake_quant_weight(w: torch.Tensor, qmax: int = QMAX) -> torch.Tensor:
    """Per-output-channel symmetric fake quantisation of a [N, K] weight (float result)."""
    w_q, s = quantize_per_channel_symmetric(w, qmax=qmax)
    return w_q.to(w.dtype) * s[:, None].to(w.dtype)


class FakeQuantLinear(nn.Module):
    """Float reference of an Int8Linear: the same integer grids, float32 matmul.

    y = dequant(quant(x; x_scale)) @ dequant(w_q; w_scale)^T + bias   [, exact GELU]"""

    def __init__(self, linear: nn.Linear, x_scale: float, weight_qmax: int = QMAX, fuse_gelu: bool = False,
                 act_qmin: int = -QMAX):
        super().__init__()
        self.act_qmin = int(act_qmin)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", fake_quant_weight(linear.weight.detach().float(), weight_qmax))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.x_scale = float(x_scale)
        self.fuse_gelu = fuse_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(fake_quant_per_tensor(x.float(), self.x_scale, qmin=self.act_qmin), self.weight, self.bias)
        return F.gelu(y) if self.fuse_gelu else y


@dataclass
class QuantInfo:
    """What the quantiser did (`to_dict`: ltp.json's "quantization" section, written by the deployable
    checkpoint, modeling/checkpoint_format.py QuantizationSection). `act_scales` stays in memory: the
    checkpoint stores each scale once, as its Linear's `x_scale` tensor."""

    backend: str  # concrete backend the Int8Linear modules were built for
    weight_qmax: int
    observer: str
    percentile: float | None
    calibration_batches: int
    act_scales: dict[str, float]
    fused_gelu: list[str] = field(default_factory=list)  # FFN input Linear names with GELU fused
    fp_layers: list[str] = field(default_factory=list)  # Linear layers deliberately left float
    attention_matmuls: str = "fp32"  # "int8": Q·Kᵀ and P·V on 8-bit grids (kernels/attention_int8.py)
    attention_scales: dict[str, dict[str, float]] = field(default_factory=dict)  # attention.self name -> q/k/v scale
    activation_range: str = "full"  # Linear inputs in [-128, 127] ('full') or [-127, 127] ('symmetric'), kernels/backends.py

    def to_dict(self) -> dict:
        return {
            "format": QUANT_FORMAT, "backend": self.backend, "weight_qmax": self.weight_qmax,
            "activation_qmax": QMAX, "activation_range": self.activation_range, "weights": "int8 per-output-channel symmetric",
            "activations": "int8 per-tensor symmetric static", "observer": self.observer,
            "percentile": self.percentile, "calibration_batches": self.calibration_batches,
            "fused_gelu": self.fused_gelu, "fp_layers": self.fp_layers,
            "attention_matmuls": self.attention_matmuls, "attention_scales": self.attention_scales,
        }


def swap_linear(model: nn.Module, name: str, new: nn.Module, *, gelu_fused: bool = False) -> None:
    """Put `new` in place of the Linear `name`. With `gelu_fused` (`new` applies the FFN's GELU
    itself, see `gelu_fusable`) the FFN block's own activation becomes the identity."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if gelu_fused:
        parent.intermediate_act_fn = nn.Identity()


def gelu_fusable(model: nn.Module, name: str) -> bool:
    """True for `...intermediate.dense` when the model's activation is exact erf GELU."""
    if not name.endswith("intermediate.dense") or getattr(model.config, "hidden_act", None) != "gelu":
        return False
    parent = model.get_submodule(name.rpartition(".")[0])
    return hasattr(parent, "intermediate_act_fn")


def _replace_linears(model: nn.Module, act_scales: dict[str, float], make, fuse_gelu: bool, skip=()) -> list[str]:
    fused = []
    for name in linear_names(model):
        if name in skip:
            continue
        if name not in act_scales:
            raise KeyError(f"no activation scale for Linear '{name}'")
        fuse = fuse_gelu and gelu_fusable(model, name)
        swap_linear(model, name, make(model.get_submodule(name), act_scales[name], fuse), gelu_fused=fuse)
        if fuse:
            fused.append(name)
    return fused


def convert_to_int8(model: nn.Module, act_scales: dict[str, float], backend: str = "auto", *,
                    fuse_gelu: bool = True, fp_layers=(), inplace: bool = False,
                    activation_range: str = "full") -> tuple[nn.Module, QuantInfo]:
    """Replace every nn.Linear (except `fp_layers`) by an Int8Linear with the given activation
    scale and range ('full' [-128, 127] or 'symmetric' [-127, 127]). `backend` is resolved once
    here ('auto' -> best for the model's device)."""
    qmin = act_qmin_of(activation_range)
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    device = next(model.parameters()).device
    concrete = resolve_backend(backend, device)
    fused = _replace_linears(
        model, act_scales,
        lambda lin, s, fuse: Int8Linear.from_float(lin, s, backend=concrete, fuse_gelu=fuse, act_qmin=qmin),
        fuse_gelu, skip=set(fp_layers))
    info = QuantInfo(backend=concrete, weight_qmax=weight_qmax(concrete), observer="", percentile=None,
                     calibration_batches=0, act_scales=dict(act_scales), fused_gelu=fused, fp_layers=list(fp_layers),
                     activation_range=activation_range)
    return model, info


def fake_quant_model(model: nn.Module, act_scales: dict[str, float], weight_qmax_: int = QMAX, *,
                     fuse_gelu: bool = True, fp_layers=(), activation_range: str = "full") -> nn.Module:
    """A copy of the float model with every Linear replaced by FakeQuantLinear (same scales and range)."""
    model = copy.deepcopy(model).eval()
    qmin = act_qmin_of(activation_range)
    _replace_linears(model, act_scales, lambda lin, s, fuse: FakeQuantLinear(lin, s, weight_qmax_, fuse, qmin),
                     fuse_gelu, skip=set(fp_layers))
    return model


#: bits the accountant charges each operand of the attention matmuls, per `attention_matmuls` setting
ATTENTION_BITS = {"fp32": 32, "int8": 8}


def int8_precision(attention_matmuls: str = "fp32"):
    """Per-op bits of the converted model for BOPs: Linear W8A8, attention matmuls FP32 (32 x 32)
    or INT8 (8 x 8; the probabilities are uint8, the other operands int8)."""
    from ltp_compress.modeling.accounting import Precision

    return Precision.int8_linear_fp_attention(attn_bits=ATTENTION_BITS[attention_matmuls])


# ----------------------------------------------------------------------------- quant-aware training


class QATLinear(nn.Linear):
    """nn.Linear with INT8 fake quantisation and a straight-through estimator (STE).

    Weights: per-output-channel symmetric (max|W[n]|/127), recomputed every step. Input
    activations: per-tensor symmetric with a scale tracked as an EMA of the batch max|x| during
    training (first batch initialises it) and frozen in eval mode. Gradients pass through the
    rounding unchanged (x + (fq(x) - x).detach()). Built by class-swapping an existing nn.Linear
    (:func:`enable_qat`), so parameters, optimiser state and state_dict keys are unchanged."""

    ema_momentum = 0.9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                m = float(x.detach().abs().max()) if x.numel() else 0.0
                if self.qat_amax is None:
                    self.qat_amax = m
                else:
                    self.qat_amax = self.ema_momentum * self.qat_amax + (1 - self.ema_momentum) * m
        w = self.weight
        w_fq = w + (fake_quant_weight(w.detach().float()).to(w.dtype) - w).detach()
        if self.qat_amax:  # None / 0 before the first training batch: activations not quantised
            s = self.qat_amax / QMAX
            x = x + (fake_quant_per_tensor(x.detach(), s) - x).detach()
        return F.linear(x, w_fq, self.bias)


#: file beside a quant-aware distilled model holding the activation scales it observed
ACT_SCALES_FILE = "act_scales.json"


def save_act_scales(model_dir, scales: dict[str, float]) -> None:
    """Write the activation scales observed by quant-aware training beside the model."""
    from pathlib import Path

    from ltp_compress.fileio import atomic_write_json

    atomic_write_json(Path(model_dir) / ACT_SCALES_FILE, {
        "source": f"quant-aware distillation (EMA of per-batch max |x|, momentum {QATLinear.ema_momentum})",
        "qmax": QMAX, "act_scales": scales})


def load_act_scales(model_dir, names: list[str]) -> tuple[dict[str, float], str]:
    """(scales, file) saved by `save_act_scales`; every Linear in `names` must have one."""
    import json
    from pathlib import Path

    path = Path(model_dir) / ACT_SCALES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run distill with quant_aware: true)")
    saved = json.loads(path.read_text())
    if saved.get("qmax", QMAX) != QMAX:
        raise ValueError(f"{path}: scales were saved for qmax {saved.get('qmax')}, this version uses {QMAX}")
    scales = saved["act_scales"]
    missing = set(names) - set(scales)
    if missing:
        raise ValueError(f"{path}: no activation scale for {sorted(missing)}")
    return scales, str(path)


def enable_qat(model: nn.Module) -> list[str]:
    """Turn every nn.Linear into a QATLinear in place. Returns their names."""
    names = linear_names(model)
    for n in names:
        m = model.get_submodule(n)
        m.__class__ = QATLinear
        m.qat_amax = None
    return names


def disable_qat(model: nn.Module) -> dict[str, float]:
    """Turn QATLinear modules back into plain nn.Linear; returns the observed activation scales."""
    scales = {}
    for n, m in model.named_modules():
        if isinstance(m, QATLinear):
            if m.qat_amax:
                scales[n] = m.qat_amax / QMAX
            m.__class__ = nn.Linear
            del m.qat_amax
    return scales
