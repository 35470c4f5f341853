"""Landing a relative-FLOPs target with threshold rules: shared by `ltp_soft` (its FLOPs controller and the
final calibration), `ltp_hard` (re-fits while finetuning), and `distill` / `quantize` (a final
re-fit, so the deployed model runs at the FLOPs asked for). Inputs only, never labels: by default
the validation split's inputs; the dev inputs only when a recipe asks for them explicitly
(`flops_calibration_inputs: dev`, unlabelled deployment inputs), which results then say."""

from __future__ import annotations

import numpy as np
import torch

from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_packed
from ltp_compress.modeling.accounting import EncoderShape, relative_flops
from ltp_compress.tasks.data import length_bucketed_batches
from ltp_compress.stages.context import VALIDATION, StageContext


def within_target(rel: float, target: float, tolerance: float) -> bool:
    """|relative FLOPs - target| <= tolerance · target."""
    return abs(rel - target) <= tolerance * target


def flops_probe_batches(ctx: StageContext, split: str, n: int, batch_size: int) -> list:
    """A fixed, seeded sample of inputs (labels unused) for FLOPs measurements: split "validation",
    "train", or "dev" (the first dev set's inputs)."""
    return probe_batches(ctx.data, ctx.seed, split, n, batch_size)


def probe_batches(data, seed: int, split: str, n: int, batch_size: int) -> list:
    """`flops_probe_batches` from the task data and the seed (usable before any stage runs)."""
    ts = {"train": data.train, VALIDATION: data.validation}.get(split) or data.dev[next(iter(data.dev))]
    batches = length_bucketed_batches(ts, batch_size, shuffle=True, seed=seed, pad_token_id=data.pad_token_id)
    out, count = [], 0
    for b in batches:
        out.append(b)
        count += b.input_ids.shape[0]
        if count >= n:
            break
    return out


@torch.no_grad()
def relative_flops_on(model, batches: list, pruning: PruningConfig, convention: str = "executed") -> float:
    model.eval()
    device = next(model.parameters()).device
    kept, lengths = [], []
    for b in batches:
        b = b.to(device)
        out = forward_packed(model, b.input_ids, b.attention_mask, b.token_type_ids, pruning, return_kept=True)
        kept.append(out.kept_tokens.cpu().numpy())
        lengths.append(b.attention_mask.sum(1).cpu().numpy())
    return relative_flops(np.concatenate(kept), np.concatenate(lengths), EncoderShape.from_config(model.config), convention)


def calibrate_threshold_offset(model, batches: list, pruning: PruningConfig, target: float, convention: str = "executed",
                               iters: int = 16):
    """Bisect one offset c on the linear ramp, θ_l -> θ_l + c·(l+1)/L, so relative FLOPs on
    `batches` ≈ target. The ramp is the paper's initialisation shape: later layers move most, the
    learned differences between layers are kept. (A multiplicative scale cannot move thresholds
    that learned to be ~0 or negative; see benchmarks/results/design_observations.md.)
    Relative FLOPs is non-increasing in c up to score ties."""
    base = np.asarray(pruning.thresholds, dtype=np.float64)
    direction = ramp(len(base))

    def at(c: float) -> float:
        return relative_flops_on(model, batches, PruningConfig(mode="threshold", thresholds=(base + c * direction).tolist()), convention)

    step = 0.25
    if at(0.0) > target:  # prune more: c > 0
        lo, hi = 0.0, step
        while at(hi) > target and hi < 64:
            lo, hi = hi, hi * 2
    else:  # pruned more than asked: c < 0
        lo, hi = -step, 0.0
        while at(lo) <= target and lo > -64:
            lo, hi = lo * 2, lo
    _, offset = bisect_to_target(at, lo, hi, target, iters)  # FLOPs fall with c: lo is above the target
    return (PruningConfig(mode="threshold", thresholds=(base + offset * direction).tolist()),
            {"offset": offset, "direction": "theta_l + offset*(l+1)/L", "relative_flops": at(offset), "convention": convention,
             "sample_examples": sum(b.input_ids.shape[0] for b in batches)})


def bisect_to_target(at, above: float, below: float, target: float, iters: int) -> tuple[float, float]:
    """Bisect a monotone FLOPs function `at` between a point whose FLOPs exceed `target` (`above`)
    and one whose FLOPs do not (`below`), in either order on the axis; returns the narrowed
    (above, below) pair. Every landing (threshold offset, top-k ratio, ToP scale) uses it."""
    for _ in range(iters):
        mid = (above + below) / 2
        if at(mid) > target:
            above = mid
        else:
            below = mid
    return above, below


def ramp(n_layers: int) -> np.ndarray:
    """The direction every offset moves the thresholds along: (l+1)/L, the paper's initial shape."""
    return np.arange(1, n_layers + 1) / n_layers


def annealed_target(start: float, target: float, step: int, total_steps: int, anneal_until: float) -> float:
    """The FLOPs schedule of `ltp_soft`'s annealed_target controller: linear from `start` (the
    relative FLOPs before training) to `target` over the first anneal_until of the steps, then flat."""
    frac = min(1.0, step / max(1.0, anneal_until * total_steps))
    return start + (target - start) * frac


class ScheduleFollower:
    """One control step of the annealed_target controller, three probe forwards (a few more
    only on a flat stretch):

        r0 = FLOPs(θ)                     on the probe inputs, hard thresholds
        if |r0 - t| <= tol·t: no move
        c1 = (t - r0) / slope             slope = d FLOPs / d offset from the last step (first: a
                                          0.05 step towards t, widened 4x while FLOPs does not
                                          move); FLOPs is non-increasing in c; |c1| <= max_move
        r1 = FLOPs(θ + c1·ramp)
        c  = secant root of (0, r0), (c1, r1), kept within [c1/4, 4·c1] and |c| <= max_move
        r  = FLOPs(θ + c·ramp); of 0, c1, c the offset whose FLOPs is nearest t is applied
             (on a tie the larger move: a flat stretch is crossed towards t)

    Weights move between probes, so a slope is only a local estimate; a step never leaves the
    FLOPs further from the schedule than it found them, and the end-of-stage calibration (a full
    bisection on more inputs) removes what is left."""

    #: the largest offset one step applies (normalised-score units; thresholds are O(0.1-1)): a
    #: slope measured across a flat stretch or a tie can be far off, and one wild move would
    #: prune (or restore) most tokens at once in the middle of training
    max_move = 0.25

    def __init__(self, batches: list, convention: str, tolerance: float, slope: float | None = None, ceiling_only: bool = False,
                 floor: float | None = None):
        self.batches, self.convention, self.tolerance, self.slope = batches, convention, tolerance, slope
        self.ceiling_only = ceiling_only  # move only when the FLOPs are above the schedule (λ handles the rest)
        # with ceiling_only: also move when the FLOPs are below `floor` (the final target) by more than the
        # tolerance, back up to it: λ alone cannot un-prune fast (the thresholds keep their momentum)
        self.floor = floor

    def __call__(self, model, pruning: PruningConfig, target_now: float) -> tuple[list[float] | None, dict]:
        base = np.asarray(pruning.thresholds, dtype=np.float64)
        direction = ramp(len(base))

        def at(c: float) -> float:
            return relative_flops_on(model, self.batches, PruningConfig(mode="threshold", thresholds=(base + c * direction).tolist()),
                                     self.convention)

        r0 = at(0.0)
        info = {"schedule": target_now, "relative_flops": r0, "offset": 0.0}
        if self.ceiling_only and r0 < target_now:
            if self.floor is None or r0 >= self.floor or within_target(r0, self.floor, self.tolerance):
                return None, info
            target_now = self.floor  # below the floor: back up to it
            info["floor"] = self.floor
        if within_target(r0, target_now, self.tolerance):
            return None, info
        towards = 1.0 if r0 > target_now else -1.0  # a larger offset prunes more
        c1 = (target_now - r0) / self.slope if self.slope else 0.05 * towards
        c1 = float(np.clip(c1, -self.max_move, self.max_move))
        r1 = at(c1)
        while r1 == r0 and abs(c1) < self.max_move:  # a flat stretch (no token crosses a threshold): widen, 4x at a time
            c1 = float(np.clip(4 * c1, -self.max_move, self.max_move))
            r1 = at(c1)
        c = c1
        if r1 != r0:
            slope = (r1 - r0) / c1
            if slope < 0:  # FLOPs falls as the offset rises; a positive slope is noise or ties: keep c1
                self.slope = slope
                c = float(np.clip((target_now - r0) / slope, *sorted((c1 / 4, 4 * c1))))
        c = float(np.clip(c, -self.max_move, self.max_move))
        # measured candidates: the one closest to the schedule is applied (never further from it than
        # not moving); on a tie the larger move (a flat stretch is crossed towards the schedule)
        tried = {0.0: r0, c1: r1}
        if c not in tried:
            tried[c] = at(c)
        c = min(tried, key=lambda o: (abs(tried[o] - target_now), -abs(o)))
        info.update(offset=c, relative_flops_after=tried[c], probe_offset=c1, probe_relative_flops=r1, slope=self.slope)
        if c == 0.0:
            return None, info
        return (base + c * direction).tolist(), info


def refit_to_target(model, ctx: StageContext, pruning: PruningConfig, cfg, batch_size: int) -> tuple[PruningConfig, dict | None]:
    """The final re-fit of `distill` / `quantize`: if the stage has a `target_flops` and the model
    prunes by thresholds, move the thresholds (one offset along the ramp) so relative FLOPs on the
    calibration inputs lands the target. Returns (rule, info or None when nothing was done)."""
    if cfg.target_flops is None or pruning.mode != "threshold":
        return pruning, None
    probe = flops_probe_batches(ctx, cfg.flops_calibration_inputs, 1024, batch_size)
    before = relative_flops_on(model, probe, pruning, cfg.flops_convention)
    new, info = calibrate_threshold_offset(model, probe, pruning, cfg.target_flops, cfg.flops_convention)
    info.update(before=before, inputs=cfg.flops_calibration_inputs, thresholds_before=pruning.thresholds)
    ctx.log.info("%s: thresholds re-fitted (offset %+.4f): relative FLOPs (%s) %.3f -> %.3f on %s inputs", cfg.id, info["offset"],
                 cfg.flops_convention, before, info["relative_flops"], cfg.flops_calibration_inputs)
    return new, info


def target_report(cfg, result) -> dict:
    """What a stage with `target_flops` reports: the target, its convention, the inputs it was
    fitted on, and whether the validation (fitted) and dev (reported) FLOPs meet it."""
    conv = cfg.flops_convention

    def rel(cost: dict) -> float:
        return cost["by_convention"][conv]["relative_flops"]

    val, dev = rel(result.extra["validation_cost"]), rel(result.cost)
    return {"target_flops": cfg.target_flops, "convention": conv, "tolerance": cfg.target_tolerance,
            "calibration_inputs": cfg.flops_calibration_inputs + (" (unlabelled deployment inputs)" if cfg.flops_calibration_inputs == "dev" else ""),
            "validation_relative_flops": val, "dev_relative_flops": dev,
            "validation_within_tolerance": within_target(val, cfg.target_flops, cfg.target_tolerance),
            "dev_within_tolerance": within_target(dev, cfg.target_flops, cfg.target_tolerance)}
