"""`top_prune`: the ToP baseline (Li et al., KDD'23, "Constraint-aware and Ranking-distilled Token
Pruning"; public code: microsoft/Moonlit, ToP/), on this project's encoder, runtimes and FLOPs count.

Gates. Hard-concrete L0 gates (Louizos et al. 2018): a gate with parameter log α draws
u ~ U(0, 1), s = sigmoid((log u - log(1-u) + log α)/β), z = clamp(s·(b-a) + a, 0, 1) with the
stretch (a, b) = (-0.1, 1.1) and temperature β (`gate_temperature`, ToP 2/3); z is exactly 0 or 1
with positive probability and differentiable in log α in between. Its probability of being open,

    P(z > 0) = sigmoid(log α - β·log(-a/b))

is what the constraint uses ("expected L0"). Coarse to fine, for every layer l that prunes
(0 .. L-2, the last prunes nothing):

* one layer gate z_l: does layer l prune at all (ToP's "pruner" gate; its forward value is the
  binary 1[z_l > 0] with the straight-through gradient of z_l, as ToP);
* `rank_bins` token gates z_{l,k} over relative ranks: the present tokens except position 0 are
  ranked by layer l's importance score (best first, the same score top-k and the thresholds use);
  the token ranked r-th of n is in bin k = floor(r·bins/n).

A token's mask after layer l is m = 1 - z_l·(1 - z_{l,k}) (a closed layer gate: the layer keeps
every token), cumulative over layers (a token dropped stays dropped), position 0 never pruned; it is
applied like the soft LTP masks (`forward_masked(mode="gated")`: output × mask, log-mask key bias).
One draw of every gate per step, shared by the batch (as ToP).

Constraint. The expected kept fraction of the present tokens at layer l is
r_l = 1 - P(z_l>0)·(1 - mean_k P(z_{l,k}>0)); an example of n0 real tokens then has
E_{l+1} = 1 + (n0 - 1)·Π_{j<=l} r_j tokens entering layer l+1 (position 0 always kept; E_0 = n0), and
the expected relative FLOPs F̂ of the batch is `expected_relative_flops` (the accountant's formula at
those lengths, in the stage's `flops_convention`, a ratio of sums over the batch like
`accounting.relative_flops`; ToP averages per-example ratios). The loss is

    task (pruning_stage_loss: CE, + logit KD, + ranking distillation when configured)
    + λ1·(F̂ - t) + λ2·(F̂ - t)²

with t falling linearly from 1.0 to `target_flops` over the first `lagrangian_warmup` of the steps;
the gates' log α step by Adam *descent* and λ1, λ2 (from 0) by Adam *ascent* (the min-max of the
Lagrangian; ToP: an optimizer with a negative learning rate), both at `reg_lr`; every log α is
clamped to [log 0.01, log 100] after each step (as ToP).

Deployment ("a gate's decision at inference is a rank"). The deterministic gates are ToP's: a
layer gate is open iff P(z_l>0) >= 1/2; of a layer's bins, round(Σ_k P(z_{l,k}=0)) (its expected
number of closed gates) are closed, those with the smallest log α. The deployed kept fraction of the
present tokens at layer l is f_l = (open bins)/bins if its layer gate is open, else 1, and the saved
model runs `PruningConfig(mode="topk", keep_ratios=R)` with R_l = Π_{j<=l} f_j: after layer l the
ceil(R_l·n0) best-scoring tokens are kept. The open bins need not be a prefix of the ranking
(ToP's own inference keeps exactly the open bins, possibly a middle one); the deployed rule keeps the
*top* fraction, i.e. the same number of tokens, always the best ranked. Then the target is landed:
one common scale c of the per-layer fractions, f_l -> min(1, c·f_l), is bisected so the top-k rule's
relative FLOPs on the calibration inputs (inputs only; top-k counts depend on the lengths only, as
`prune_baselines.fit_topk_ratio`) is target_flops within ±0.01 (`LANDING_TOLERANCE`; a miss is a
warning). Optionally (`finetune_epochs`) the weights are finetuned under that fixed rule
(`train_with_fixed_pruning`, as topk_prune); either way the model is evaluated and saved as a plain
top-k checkpoint, so quantize / the ONNX export / the runtimes deploy it unchanged.

Resume: the gate phase checkpoints and resumes like ltp_soft; an interrupted finetune phase starts
the stage over (its checkpoint is written for the finetune phase's config and ignored by the gate
phase).
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import torch
from torch import nn

from ltp_compress.errors import UserError
from ltp_compress.modeling.accounting import EncoderShape, relative_flops
from ltp_compress.modeling.model_io import load_stage_model
from ltp_compress.modeling.pruned_encoder import PruningConfig, forward_masked, topk_tokens_per_layer
from ltp_compress.stages import distributed as dist
from ltp_compress.stages.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from ltp_compress.stages.common import (
    adamw_with_warmup, check_global_batch, check_rank_distill_layers, evaluate, grad_sync, load_kd_teacher, make_accelerator,
    optimizer_step, pruning_stage_loss, rank_batches, rank_distill_on, set_seed, steps_plan, train_batches, weight_param_groups,
    weighted,
)
from ltp_compress.stages.configs import TopPruneStage
from ltp_compress.stages.context import VALIDATION, StageContext, StageResult
from ltp_compress.stages.finetune import train_with_fixed_pruning
from ltp_compress.stages.flops_target import bisect_to_target, target_report
from ltp_compress.stages.prune_baselines import probe_lengths

#: the hard-concrete stretch interval (a, b) (Louizos et al. 2018; ToP's limit_a, limit_b)
STRETCH = (-0.1, 1.1)
#: every log α is clamped to this range after each step (ToP's constrain_parameters)
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
#: the deployed rule's relative FLOPs on the calibration inputs must be within this of target_flops
LANDING_TOLERANCE = 0.01
#: the smallest landing scale tried (its FLOPs are the floor: one token after every pruning layer)
MIN_SCALE = 1e-4
#: a deterministic kept fraction of 0 (every bin closed) is scaled from this, so the landing can raise it
MIN_FRACTION = 1e-3
_EPS = 1e-6


# ----------------------------------------------------------------------------- hard-concrete gates


def log_alpha_init(droprate: float) -> float:
    """log α = log((1-p)/p) (Louizos et al.; ToP's reset_loga), clamped to LOG_ALPHA_RANGE."""
    return float(np.clip(math.log(1 - droprate) - math.log(droprate), *LOG_ALPHA_RANGE))


def open_probability(log_alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """P(z > 0) of a hard-concrete gate = 1 - Q_s(-a/(b-a)) = sigmoid(log α - β·log(-a/b))."""
    a, b = STRETCH
    return torch.sigmoid(log_alpha - beta * math.log(-a / b))


def sample_gates(log_alpha: torch.Tensor, beta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard-concrete draw per entry of `log_alpha` (differentiable in log α)."""
    a, b = STRETCH
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype) * (1 - 2 * _EPS) + _EPS
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    return (s * (b - a) + a).clamp(0.0, 1.0)


class TopGates(nn.Module):
    """ToP's gates for the P = L-1 pruning layers and the two Lagrange multipliers."""

    def __init__(self, num_pruning_layers: int, bins: int, droprate_init: float, layer_droprate_init: float, beta: float):
        super().__init__()
        self.beta = beta
        # ToP initialises with N(mean, 0.01) noise: the bins of a layer are not tied at the start
        self.token_log_alpha = nn.Parameter(
            (log_alpha_init(droprate_init) + 0.01 * torch.randn(num_pruning_layers, bins)).clamp(*LOG_ALPHA_RANGE))
        self.layer_log_alpha = nn.Parameter(
            (log_alpha_init(layer_droprate_init) + 0.01 * torch.randn(num_pruning_layers)).clamp(*LOG_ALPHA_RANGE))
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def gate_parameters(self) -> list[nn.Parameter]:
        return [self.token_log_alpha, self.layer_log_alpha]

    def multipliers(self) -> list[nn.Parameter]:
        return [self.lambda_1, self.lambda_2]

    @torch.no_grad()
    def clamp_(self) -> None:
        for p in self.gate_parameters():
            p.clamp_(*LOG_ALPHA_RANGE)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer gates [P] as 1[z>0] with z's straight-through gradient, token gates [P, bins])."""
        z_layer = sample_gates(self.layer_log_alpha, self.beta)
        z_layer = (z_layer > 0).to(z_layer.dtype) + z_layer - z_layer.detach()
        return z_layer, sample_gates(self.token_log_alpha, self.beta)

    def expected_keep_fractions(self) -> torch.Tensor:
        """r_l = 1 - P(layer gate open)·(1 - mean over bins of P(bin open)). [P], differentiable."""
        p_layer = open_probability(self.layer_log_alpha, self.beta)
        p_token = open_probability(self.token_log_alpha, self.beta).mean(1)
        return 1 - p_layer * (1 - p_token)

    @torch.no_grad()
    def deterministic(self) -> dict:
        """ToP's deterministic gates: layer open iff P(open) >= 1/2; per layer the round(expected
        closed) bins with the smallest log α closed. Kept fraction f_l = open bins/bins, or 1."""
        p_layer = open_probability(self.layer_log_alpha, self.beta).cpu()
        p_token = open_probability(self.token_log_alpha, self.beta).cpu()
        la = self.token_log_alpha.detach().cpu()
        bins = la.shape[1]
        layer_open, open_bins, fractions = [], [], []
        for l in range(la.shape[0]):
            closed = int(round(float((1 - p_token[l]).sum())))
            is_open = torch.ones(bins, dtype=torch.bool)
            if closed > 0:
                is_open[torch.argsort(la[l], stable=True)[:closed]] = False
            layer_open.append(bool(round(1 - float(p_layer[l])) == 0))
            open_bins.append([int(k) for k in torch.nonzero(is_open).flatten()])
            fractions.append(len(open_bins[-1]) / bins if layer_open[-1] else 1.0)
        return {"layer_open": layer_open, "open_bins": open_bins, "kept_fraction": fractions,
                "layer_open_probability": [float(v) for v in p_layer],
                "token_open_probability": [[float(v) for v in row] for row in p_token],
                "expected_kept_fraction": [float(v) for v in self.expected_keep_fractions().cpu()],
                "lambda_1": float(self.lambda_1), "lambda_2": float(self.lambda_2)}


def gated_token_mask(score: torch.Tensor, present: torch.Tensor, z_layer: torch.Tensor, z_token: torch.Tensor) -> torch.Tensor:
    """One layer's mask m = 1 - z_layer·(1 - z_token[bin]) [b, s]: the present tokens except
    position 0 ranked by `score` (best first, rank r of n), bin = floor(r·bins/n). Entries of absent
    tokens and of position 0 are not used (`forward_masked` multiplies / overrides them)."""
    ranked = present.clone()
    ranked[:, 0] = False
    key = score.detach().masked_fill(~ranked, -float("inf"))
    order = key.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    n = ranked.sum(1, keepdim=True).clamp_min(1)
    bins = z_token.shape[0]
    k = torch.div(rank * bins, n, rounding_mode="floor").clamp(max=bins - 1)
    return 1 - z_layer * (1 - z_token[k])


# ----------------------------------------------------------------------------- expected FLOPs


def expected_relative_flops(fractions: torch.Tensor, lengths: torch.Tensor, shape: EncoderShape,
                            convention: str = "executed") -> torch.Tensor:
    """Relative FLOPs of inputs of `lengths` [N] when layer l (0 .. L-2) keeps the fraction
    `fractions[l]` [L-1] of its present tokens other than position 0 (differentiable in fractions).

    Derivation, from `accounting.layer_macs`: a layer that n tokens enter and n_out leave costs
        MACs(n, n_out) = 3·n·d² + 2·n²·d + m·d² + 2·n_out·d·d_ff,   m = n_out ("executed") or n ("paper").
    With the kept fractions, an example of n0 tokens has E_0 = n0 entering layer 0 and
    E_{l+1} = 1 + (n0 - 1)·Π_{j<=l} fractions[j] entering layer l+1; layer l's tokens leaving are
    E_{l+1} (the last layer's are E_{L-1}: it prunes nothing). Then, as `accounting.relative_flops`
    (FLOPs = 2·MACs, the 2 cancels), a ratio of sums over the examples:
        Σ_i Σ_l MACs(E_l(i), E_{l+1}(i)) / Σ_i Σ_l MACs(n0(i), n0(i)).
    For fractions fixed it equals `relative_flops` on those (fractional) token counts."""
    n0 = lengths.to(torch.float64)[:, None]  # [N, 1]
    kept = torch.cumprod(fractions.to(torch.float64), 0)[None, :]  # [1, L-1]
    entering = torch.cat([n0, 1 + (n0 - 1) * kept], dim=1)  # [N, L]
    leaving = torch.cat([entering[:, 1:], entering[:, -1:]], dim=1)
    d, d_ff = shape.hidden, shape.intermediate

    def macs(n, n_out):
        m = n_out if convention == "executed" else n
        return 3 * n * d * d + 2 * n * n * d + m * d * d + 2 * n_out * d * d_ff

    dense = n0.expand_as(entering)
    return macs(entering, leaving).sum() / macs(dense, dense).sum()


def constraint_target(step: int, total_steps: int, target: float, warmup: float) -> float:
    """The constraint's target at `step`: 1.0 falling linearly to `target` over warmup·total steps."""
    if warmup <= 0:
        return target
    return 1.0 - (1.0 - target) * min(1.0, step / max(1.0, warmup * total_steps))


class GatedForward(nn.Module):
    """The module a training step runs (and DDP wraps): the classifier under one draw of the gates,
    and the Lagrangian term of that batch. forward -> (ForwardOutput, lagrangian, F̂)."""

    def __init__(self, model: nn.Module, gates: TopGates, shape: EncoderShape, convention: str):
        super().__init__()
        self.model, self.gates, self.shape, self.convention = model, gates, shape, convention

    def forward(self, input_ids, attention_mask, token_type_ids, *, target_now: float, return_scores: bool = False):
        z_layer, z_token = self.gates.sample()

        def masks(l: int, score: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
            return gated_token_mask(score, alive > 0, z_layer[l], z_token[l])

        out = forward_masked(self.model, input_ids, attention_mask, token_type_ids, mode="gated", token_masks=masks,
                             return_scores=return_scores)
        expected = expected_relative_flops(self.gates.expected_keep_fractions(), attention_mask.sum(1), self.shape, self.convention)
        gap = expected - target_now
        lagrangian = self.gates.lambda_1 * gap + self.gates.lambda_2 * gap * gap
        return out, lagrangian.to(out.logits.dtype), expected


# ----------------------------------------------------------------------------- deployment


def keep_ratios_from_fractions(fractions: list[float]) -> list[float]:
    """Per-layer kept fractions of the present tokens [L-1] -> top-k keep_ratios [L] (of the
    original length, cumulative; the last layer prunes nothing and repeats the previous ratio)."""
    ratios = np.cumprod(np.asarray(fractions, dtype=np.float64)).tolist()
    return ratios + ratios[-1:]


def _topk_flops(lengths: np.ndarray, shape: EncoderShape, keep_ratios: list[float], convention: str) -> float:
    return relative_flops(topk_tokens_per_layer(lengths, keep_ratios), lengths, shape, convention)


def land_keep_ratios(fractions: list[float], lengths: np.ndarray, shape: EncoderShape, target: float, convention: str,
                     iters: int = 40) -> tuple[list[float], dict]:
    """Bisect one scale c of the per-layer fractions, f_l -> min(1, c·f_l), so the top-k rule's
    relative FLOPs on inputs of `lengths` is nearest `target` (non-decreasing in c). A target
    below the floor (one token kept after every pruning layer) is an error. A fraction of 0 (every
    bin closed; top-k still keeps position 0) is scaled from MIN_FRACTION."""
    f = np.maximum(np.asarray(fractions, dtype=np.float64), MIN_FRACTION)

    def ratios(c: float) -> list[float]:
        return keep_ratios_from_fractions(np.minimum(1.0, c * f).tolist())

    def at(c: float) -> float:
        return _topk_flops(lengths, shape, ratios(c), convention)

    hi = 1.0 / float(f.min())  # every fraction 1: relative FLOPs 1 >= target
    lo = MIN_SCALE
    if at(lo) > target:
        raise UserError(f"target_flops {target} is below what top-k pruning can reach on these inputs ({at(lo):.3f} "
                        f"{convention} keeping one token after every layer): raise target_flops")
    hi, lo = bisect_to_target(at, hi, lo, target, iters)  # FLOPs rise with the scale
    scale = min((lo, hi), key=lambda c: (abs(at(c) - target), c))
    rel = at(scale)
    return ratios(scale), {"scale": scale, "relative_flops": rel, "convention": convention,
                           "within_tolerance": abs(rel - target) <= LANDING_TOLERANCE, "tolerance": LANDING_TOLERANCE,
                           "sample_examples": int(len(lengths))}


# ----------------------------------------------------------------------------- the stage


def run(cfg: TopPruneStage, ctx: StageContext) -> StageResult:
    set_seed(ctx.seed)
    accelerator = make_accelerator(cfg.mixed_precision)
    check_global_batch(cfg)
    model, tokenizer, _ = load_stage_model(ctx.source_model, ctx.task)
    L = model.config.num_hidden_layers
    if L < 2:
        raise UserError(f"stage '{cfg.id}': top_prune needs at least 2 layers (the last layer prunes nothing)")
    shape = EncoderShape.from_config(model.config)
    gates = TopGates(L - 1, cfg.rank_bins, cfg.droprate_init, cfg.layer_droprate_init, cfg.gate_temperature)
    inner = GatedForward(model, gates, shape, cfg.flops_convention)

    steps_per_epoch = len(train_batches(ctx, cfg.batch_size, 0))
    total_steps, n_epochs = steps_plan(steps_per_epoch, cfg.epochs)
    opt, sched = adamw_with_warmup(weight_param_groups(model, cfg.weight_decay), cfg.lr, cfg.weight_decay, total_steps, cfg.warmup_ratio)
    gate_opt = torch.optim.Adam(gates.gate_parameters(), lr=cfg.reg_lr)
    lagrange_opt = torch.optim.Adam(gates.multipliers(), lr=cfg.reg_lr, maximize=True)  # ascent on λ1, λ2
    net, opt, gate_opt, lagrange_opt = accelerator.prepare(inner, opt, gate_opt, lagrange_opt)
    weights = list(model.parameters())  # gradient clipping: the weights only
    teacher = load_kd_teacher(cfg, ctx, accelerator.device)
    ranking = rank_distill_on(cfg)
    check_rank_distill_layers(cfg, L)
    lengths = probe_lengths(ctx.data, ctx.seed, cfg)  # the calibration inputs (inputs only)
    lengths_t = torch.as_tensor(lengths)
    floor = _topk_flops(lengths, shape, [0.0] * L, cfg.flops_convention)  # one token after every pruning layer
    if floor > cfg.target_flops:  # before any training: the landing could not reach it
        raise UserError(f"stage '{cfg.id}': target_flops {cfg.target_flops} is below what top-k pruning can reach on the "
                        f"{cfg.flops_calibration_inputs} inputs ({floor:.3f} {cfg.flops_convention}, one token kept after every "
                        f"layer): raise target_flops")

    def expected_on_calibration() -> float:
        with torch.no_grad():
            return float(expected_relative_flops(gates.expected_keep_fractions().cpu(), lengths_t, shape, cfg.flops_convention))

    history, step, start_epoch = [], 0, 0
    last = {"loss": float("nan"), "task_loss": float("nan"), "rank_loss": None, "lagrangian": float("nan"),
            "expected_flops": float("nan"), "target_now": 1.0}
    expected_start = expected_on_calibration()
    optimizers = {"weights": opt, "gates": gate_opt, "lagrange": lagrange_opt}
    ckpt = load_checkpoint(ctx.out_dir, cfg, ctx.log)
    if ckpt is not None:
        ckpt.restore(model, optimizers, sched)
        with torch.no_grad():
            for name, p in gates.named_parameters():
                p.copy_(ckpt.tensors[f"gates/{name}"].to(p.device))
        history, last, step, start_epoch = ckpt.state["history"], ckpt.state["last"], ckpt.step, ckpt.epoch
        expected_start = ckpt.state["expected_flops_start"]
        ctx.log.info("%s: resuming from the checkpoint at step %d of %d (epoch %d)", cfg.id, step, total_steps, start_epoch + 1)

    rec = dist.recorder()
    for epoch in range(start_epoch, n_epochs):
        net.train()
        for batch, local in rank_batches(ctx, cfg, epoch, step, steps_per_epoch, total_steps, accelerator.device, rec):
            target_now = constraint_target(step, total_steps, cfg.target_flops, cfg.lagrangian_warmup)
            with grad_sync(accelerator, net):
                with accelerator.autocast():
                    out, lagrangian, expected = net(batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                                    target_now=target_now, return_scores=ranking)
                    stage_loss = pruning_stage_loss(out, batch, teacher, cfg, ctx.task.num_labels)
                    loss = weighted(stage_loss.total, local.example_weight) + weighted(lagrangian, local.example_weight)
                optimizer_step(accelerator, net, loss, cfg.max_grad_norm, [opt, gate_opt, lagrange_opt], sched, clip_params=weights)
            gates.clamp_()
            step += 1
            last = {"loss": loss.item(), "task_loss": stage_loss.total.item(),
                    "rank_loss": None if stage_loss.rank is None else stage_loss.rank.item(), "lagrangian": lagrangian.item(),
                    "expected_flops": expected.item(), "target_now": target_now}
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 and step < total_steps:
                save_checkpoint(ctx.out_dir, cfg, step=step, epoch=epoch, model=model, optimizers=optimizers, scheduler=sched,
                                tensors={f"gates/{n}": p for n, p in gates.named_parameters()},
                                state={"history": history, "last": last, "expected_flops_start": expected_start})
            dist.maybe_fail(cfg.id, step)
        if not dist.grad_sync_disabled():
            dist.check_identical(torch.cat([p.detach().flatten() for p in gates.parameters()]),
                                 f"{cfg.id}: gates after epoch {epoch + 1}")
        det = gates.deterministic()
        rule = PruningConfig(mode="topk", keep_ratios=keep_ratios_from_fractions(det["kept_fraction"]))
        ev = evaluate(model, ctx, rule, cfg.eval_batch_size, splits=[VALIDATION])
        rel = ev.validation_cost["by_convention"][cfg.flops_convention]["relative_flops"]
        history.append({"epoch": epoch + 1, "step": step, **last, "lambda_1": det["lambda_1"], "lambda_2": det["lambda_2"],
                        "expected_flops_calibration": expected_on_calibration(), "layer_open": det["layer_open"],
                        "kept_fraction": det["kept_fraction"], "validation": ev.metrics[VALIDATION],
                        "validation_main": ev.selection_score, "validation_relative_flops": rel,
                        "flops_convention": cfg.flops_convention})
        ctx.log.info("%s epoch %d: loss %.4f, expected FLOPs %.3f (constraint target %.3f), λ1 %.4g, λ2 %.4g, layers open %s, "
                     "kept fractions %s; deployed (before landing): validation main %.4f, relative FLOPs (%s) %.3f", cfg.id,
                     epoch + 1, last["loss"], last["expected_flops"], last["target_now"], det["lambda_1"], det["lambda_2"],
                     det["layer_open"], np.round(det["kept_fraction"], 3).tolist(), ev.selection_score, cfg.flops_convention, rel)

    # deployment: deterministic gates -> top-k keep ratios -> one scale lands the target
    det = gates.deterministic()
    before = keep_ratios_from_fractions(det["kept_fraction"])
    landed, landing = land_keep_ratios(det["kept_fraction"], lengths, shape, cfg.target_flops, cfg.flops_convention)
    landing.update(keep_ratios_before=before, keep_ratios_after=landed, inputs=cfg.flops_calibration_inputs,
                   relative_flops_before=_topk_flops(lengths, shape, before, cfg.flops_convention))
    ctx.log.info("%s: deployed top-k keep ratios %s -> %s (scale %.4f): relative FLOPs (%s) %.3f -> %.3f on %s inputs (target %.3f)",
                 cfg.id, np.round(before, 3).tolist(), np.round(landed, 3).tolist(), landing["scale"], cfg.flops_convention,
                 landing["relative_flops_before"], landing["relative_flops"], cfg.flops_calibration_inputs, cfg.target_flops)
    if not landing["within_tolerance"]:
        ctx.log.warning("%s: WARNING: the landed top-k rule's relative FLOPs %.4f is not within ±%.2f of target_flops %.3f (the "
                        "token counts move in integer steps on few calibration inputs)", cfg.id, landing["relative_flops"],
                        LANDING_TOLERANCE, cfg.target_flops)
    pruning = PruningConfig(mode="topk", keep_ratios=landed)
    gate_report = {**det, "expected_flops_start": expected_start, "expected_flops_end": expected_on_calibration(),
                   "expected_flops_inputs": cfg.flops_calibration_inputs, "convention": cfg.flops_convention}

    # finetune phase (or none): evaluates on every split and saves the model with the rule
    if dist.is_main():
        shutil.rmtree(checkpoint_dir(ctx.out_dir), ignore_errors=True)  # the gate phase's; finetune writes its own
    dist.barrier()
    finetune_cfg = cfg.model_copy(update={"epochs": cfg.finetune_epochs, "finetune_epochs": 0.0})
    result = train_with_fixed_pruning(finetune_cfg, ctx, model, tokenizer, pruning)
    finetune_history = result.extra.pop("history")
    result.extra.update(gate_history=history, gate_train_steps=step, finetune_history=finetune_history, gates=gate_report,
                        lagrange_multipliers=[{"epoch": h["epoch"], "lambda_1": h["lambda_1"], "lambda_2": h["lambda_2"]}
                                              for h in history],
                        landing=landing)
    result.extra["flops_target"] = target_report(cfg, result)
    return result
