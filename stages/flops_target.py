"""Landing a relative-FLOPs target with threshold rules: shared by `ltp_soft` (λ steering and the
final calibration) and `ltp_hard` (re-fits while finetuning). Inputs only, never labels."""

from __future__ import annotations

import numpy as np
import torch

from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_packed
from ltp_compress.modeling.accounting import EncoderShape, relative_flops
from ltp_compress.tasks.data import length_bucketed_batches
from ltp_compress.stages.context import StageContext


def within_target(rel: float, target: float, tolerance: float) -> bool:
    """|relative FLOPs - target| <= tolerance · target."""
    return abs(rel - target) <= tolerance * target


def flops_probe_batches(ctx: StageContext, split: str, n: int, batch_size: int) -> list:
    """A fixed, seeded sample of inputs (labels unused) for FLOPs measurements."""
    ts = ctx.data.train if split == "train" else ctx.data.dev[next(iter(ctx.data.dev))]
    batches = length_bucketed_batches(ts, batch_size, shuffle=True, seed=ctx.seed, pad_token_id=ctx.data.pad_token_id)
    out, count = [], 0
    for b in batches:
        out.append(b)
        count += b.input_ids.shape[0]
        if count >= n:
            break
    return out


@torch.no_grad()
def relative_flops_on(model, batches: list, pruning: PruningConfig) -> float:
    model.eval()
    device = next(model.parameters()).device
    kept, lengths = [], []
    for b in batches:
        b = b.to(device)
        out = forward_packed(model, b.input_ids, b.attention_mask, b.token_type_ids, pruning, return_kept=True)
        kept.append(out.kept_tokens.cpu().numpy())
        lengths.append(b.attention_mask.sum(1).cpu().numpy())
    return relative_flops(np.concatenate(kept), np.concatenate(lengths), EncoderShape.from_config(model.config))


def calibrate_threshold_offset(model, batches: list, pruning: PruningConfig, target: float, iters: int = 16):
    """Bisect one offset c on the linear ramp, θ_l -> θ_l + c·(l+1)/L, so relative FLOPs on
    `batches` ≈ target. The ramp is the paper's initialisation shape: later layers move most, the
    learned differences between layers are kept. (A multiplicative scale cannot move thresholds
    that learned to be ~0 or negative; see benchmarks/results/design_observations.md.)
    Relative FLOPs is non-increasing in c up to score ties."""
    base = np.asarray(pruning.thresholds, dtype=np.float64)
    ramp = np.arange(1, len(base) + 1) / len(base)

    def at(c: float) -> float:
        return relative_flops_on(model, batches, PruningConfig(mode="threshold", thresholds=(base + c * ramp).tolist()))

    step = 0.25
    if at(0.0) > target:  # prune more: c > 0
        lo, hi = 0.0, step
        while at(hi) > target and hi < 64:
            lo, hi = hi, hi * 2
    else:  # pruned more than asked: c < 0
        lo, hi = -step, 0.0
        while at(lo) <= target and lo > -64:
            lo, hi = lo * 2, lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if at(mid) > target:
            lo = mid
        else:
            hi = mid
    offset = hi
    return (PruningConfig(mode="threshold", thresholds=(base + offset * ramp).tolist()),
            {"offset": offset, "direction": "theta_l + offset*(l+1)/L", "relative_flops": at(offset),
             "sample_examples": sum(b.input_ids.shape[0] for b in batches)})
