"""Learned Token Pruning forward passes over Hugging Face BERT / RoBERTa weights.

Two implementations of the same model, sharing the per-layer blocks below:

* ``forward_masked`` — padded batch ``[b, s, d]``; pruned tokens stay in the tensor but are
  removed from attention (as keys and as score-contributing queries). Used for training
  (``dense``, ``soft``, ``hard`` modes) and as the reference for the packed path.
* ``forward_packed`` — inference that really removes tokens: right after layer l's attention
  softmax (where the importance scores come from) the kept tokens of the whole batch are gathered
  into one packed ``[T, d]`` matrix (no padding) that feeds layer l's output projection and FFN
  and every later layer; attention runs per sequence, padded only to the longest *surviving*
  sequence of the batch at that layer. Pruned tokens never enter another matmul. (The masked
  path computes layer l's output rows of the tokens it prunes there, but nothing reads them, so
  both give the same logits.)

Token importance (Kim et al., KDD'22, Eq. 6) is the attention probability a token receives,
averaged over heads and query rows, over **real, still-present tokens only**:

    s_l(i) = 1/(H * n) * sum_h sum_{j present} A_h(j, i)           (paper)

Its mean over the n present tokens is always 1/n, so a fixed threshold on s would prune long
inputs far more than short ones. We use the length-normalised score

    score_l(i) = n * s_l(i) = 1/H * sum_h sum_{j present} A_h(j, i)

("how many queries' worth of attention the token receives"; 1.0 = an average share), which
means the same for any length and is independent of batch padding. The paper's θ on s at an
example's real length n corresponds to n·θ here: θ_L = 0.01 is 0.25 for a 25-token SST-2
sentence and 1.28 at the paper's padded length 128 (the recipe default, 0.5, sits at n ≈ 50).
The paper's temperature range 1e-4..2e-3 likewise scales by n (0.0025..0.05 at n=25,
0.0128..0.256 at n=128).

Never pruned: position 0 ([CLS] / <s>), which the classifier reads. [SEP] / </s> tokens are
scored like any other token (they usually receive the most attention and so survive anyway).
A token pruned at layer l has score 0 at every later layer and stays pruned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from ltp_compress.kernels.token_pack import PackedLayout

PruningMode = Literal["none", "threshold", "topk"]
#: pruning mode of an inference model -> `forward_masked` mode with the same binary keep rule
MASKED_MODE = {"none": "dense", "threshold": "hard", "topk": "topk"}


@dataclass
class PruningConfig:
    """How an inference model chooses the tokens to keep after each layer (JSON-serialisable).

    mode "threshold": keep token i after layer l iff score_l(i) > thresholds[l].
    mode "topk": keep the ceil(keep_ratios[l] * n0) highest-scoring tokens after layer l, with n0
    the example's original number of real tokens (SpAtten-style baseline).
    """

    mode: PruningMode = "none"
    thresholds: list[float] | None = None  # [L], normalised-score units
    keep_ratios: list[float] | None = None  # [L], fraction of the original length

    @property
    def masked_mode(self) -> str:
        """The `forward_masked` mode that trains/evaluates under this rule with binary masks."""
        return MASKED_MODE[self.mode]

    @property
    def thresholds_tensor(self) -> torch.Tensor | None:
        return None if self.thresholds is None else torch.tensor(self.thresholds)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "PruningConfig":
        return cls(**d) if d else cls()


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [b, num_labels]
    embeddings: torch.Tensor | None = None  # [b, s, d] embedding-layer output (for KD)
    soft_masks: list[torch.Tensor] = field(default_factory=list)  # per layer [b, s], cumulative
    kept_tokens: torch.Tensor | None = None  # [b, L] tokens entering each layer
    scores: list[torch.Tensor] = field(default_factory=list)  # per layer [b, s] importance score (`return_scores`)


def linear_threshold_init(num_layers: int, final_threshold: float) -> list[float]:
    """θ_l = θ_L · (l+1)/L: rising linearly with depth, θ_L at the last layer (paper §4)."""
    return [final_threshold * (i + 1) / num_layers for i in range(num_layers)]


def topk_keep_ratios(num_layers: int, final_ratio: float, dense_layers: int = 3) -> list[float]:
    """SpAtten-style schedule. The fraction of the original tokens *entering* layer l is 1 for the
    first `dense_layers` layers, then decays linearly to `final_ratio` at the last layer.
    Returned: keep_ratios[l] = fraction kept *after* layer l (= entering layer l+1)."""
    dense_layers = min(dense_layers, num_layers - 1)
    span = num_layers - dense_layers

    def entering(l: int) -> float:
        if l < dense_layers:
            return 1.0
        return 1.0 - (1.0 - final_ratio) * (l - dense_layers + 1) / span

    return [entering(l + 1) if l + 1 < num_layers else final_ratio for l in range(num_layers)]


# ----------------------------------------------------------------------------- model parts


def base_model(model: nn.Module) -> nn.Module:
    """The BertModel / RobertaModel inside a *ForSequenceClassification model."""
    return model.base_model


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return base_model(model).encoder.layer


def num_heads(model: nn.Module) -> int:
    return model.config.num_attention_heads


def classifier_head(model: nn.Module, h_cls: torch.Tensor) -> torch.Tensor:
    """Logits from the [CLS]/<s> hidden state, as the HF head computes them. h_cls: [b, d]."""
    features = h_cls.unsqueeze(1)  # [b, 1, d]
    if model.config.model_type == "roberta":
        return model.classifier(features)
    pooler = base_model(model).pooler
    pooled = pooler(features) if pooler is not None else h_cls
    return model.classifier(model.dropout(pooled))


def embed(model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """Embedding-layer output [b, s, d] (HF module: RoBERTa derives positions from input_ids).
    Models with a single token type (RoBERTa) ignore segment ids a BERT-style tokenizer may give."""
    if model.config.type_vocab_size == 1:
        token_type_ids = None
    return base_model(model).embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


def _qkv(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sa = layer.attention.self
    return sa.query(x), sa.key(x), sa.value(x)  # each [..., d]


def _post_attention(layer: nn.Module, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Attention output projection + residual + LayerNorm, then the FFN block. [..., d] -> [..., d]
    Same computation as HF's BertSelfOutput / BertIntermediate / BertOutput (and the RoBERTa
    twins), calling their submodules directly (swapped-in INT8 Linears and a GELU fused into
    the FFN kernel are respected); dropout only runs in training."""
    so, inter, out = layer.attention.output, layer.intermediate, layer.output
    a = so.dense(ctx)
    h = so.LayerNorm((so.dropout(a) if so.training else a) + x)
    f = inter.intermediate_act_fn(inter.dense(h))
    o = out.dense(f)
    return out.LayerNorm((out.dropout(o) if out.training else o) + h)


def _attention_scores(layer: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled Q·Kᵀ [b, H, s, dh] x [b, H, t, dh] -> [b, H, s, t]: float32, or on 8-bit grids when
    the quantiser attached INT8 attention matmuls (`attention.self.int8_matmuls`)."""
    sa = layer.attention.self
    int8 = getattr(sa, "int8_matmuls", None)
    if int8 is None:
        return torch.matmul(q, k.transpose(-1, -2)) * sa.scaling
    return int8.scores(q, k, sa.scaling)  # one multiplication by q_scale·k_scale·scaling, as the ONNX graph


def _attention_context(layer: nn.Module, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """P·V [b, H, s, t] x [b, H, t, dh] -> [b, H, s, dh] (INT8 like `_attention_scores`)."""
    int8 = getattr(layer.attention.self, "int8_matmuls", None)
    return torch.matmul(probs, v) if int8 is None else int8.context(probs, v)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, d = t.shape
    return t.view(b, s, heads, d // heads).transpose(1, 2)  # [b, H, s, dh]


# ----------------------------------------------------------------------------- masked path


def forward_masked(
    model: nn.Module,
    input_ids: torch.Tensor,  # [b, s]
    attention_mask: torch.Tensor,  # [b, s] 1 = real token
    token_type_ids: torch.Tensor | None = None,
    *,
    mode: Literal["dense", "soft", "hard", "topk", "gated"] = "dense",
    thresholds: torch.Tensor | None = None,  # [L] (learnable in soft mode)
    temperature: float = 0.1,
    keep_ratios: list[float] | None = None,
    return_scores: bool = False,
    token_masks: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> ForwardOutput:
    """Padded-batch forward. `soft`: mask m = sigmoid((score-θ)/T) multiplies each layer's output
    and (as log m) the attention to that token in later layers — the differentiable relaxation of
    removal. `hard`/`topk`: binary keep mask; equals `forward_packed` on the same inputs.
    `return_scores`: `out.scores[l]` is layer l's importance score [b, s] (differentiable), for every
    layer including the last (which prunes nothing) — ranking distillation reads them.
    `gated` (ToP's gates, stages/top_prune.py): layer l's mask m_l = token_masks(l, score_l, alive)
    [b, s] in [0, 1] is computed outside and applied exactly as `soft` applies its sigmoid masks
    (cumulative, output × mask, log-mask key bias in later layers), except that a token whose
    cumulative mask is exactly 0 is removed from attention like a `hard` one; position 0 is never
    pruned and the last layer prunes nothing."""
    layers = encoder_layers(model)
    heads = num_heads(model)
    x = embed(model, input_ids, token_type_ids)  # [b, s, d]
    embeddings = x
    b, s, d = x.shape
    alive = attention_mask.to(x.dtype)  # [b, s] cumulative keep mask (soft: in [0, 1])
    n0 = attention_mask.sum(1)  # [b]
    soft_masks: list[torch.Tensor] = []
    kept = []
    scores: list[torch.Tensor] = []
    neg = torch.finfo(x.dtype).min
    pos0 = torch.zeros(b, s, dtype=torch.bool, device=x.device)
    pos0[:, 0] = True
    for l, layer in enumerate(layers):
        kept.append(alive.detach().gt(0.5).sum(1))
        q, k, v = (_split_heads(t, heads) for t in _qkv(layer, x))  # [b, H, s, dh]
        att = _attention_scores(layer, q, k)  # [b, H, s, s]
        if mode == "soft":
            key_bias = torch.log(alive.clamp_min(1e-30))
        elif mode == "gated":  # as soft; an exact 0 (a closed gate) removes the key like hard
            key_bias = torch.log(alive.clamp_min(1e-30)).masked_fill(alive <= 0, neg)
        else:
            key_bias = torch.zeros_like(alive).masked_fill(alive <= 0, neg)
        att = att + key_bias[:, None, None, :]
        probs = att.softmax(-1)  # [b, H, s, s]
        ctx = _attention_context(layer, layer.attention.self.dropout(probs), v)  # [b, H, s, dh]
        ctx = ctx.transpose(1, 2).reshape(b, s, d)
        out = _post_attention(layer, ctx, x)  # [b, s, d]
        last = l == len(layers) - 1
        if return_scores or not (mode == "dense" or (last and mode != "soft")):
            # score_l(i) = 1/H Σ_h Σ_{j present} A_h(j, i)   [b, s]
            score = (probs * alive[:, None, :, None]).sum(dim=(1, 2)) / heads
            if return_scores:
                scores.append(score)
        if mode == "dense" or (last and mode != "soft"):
            x = out
            continue
        if mode in ("soft", "gated"):
            m = torch.sigmoid((score - thresholds[l]) / temperature) if mode == "soft" else token_masks(l, score, alive)
            m = torch.where(pos0, torch.ones_like(m), m)
            alive = alive * m
            soft_masks.append(alive)
            x = out * alive.unsqueeze(-1)
        else:
            if mode == "hard":
                keep = score > thresholds[l]
            else:
                keep = _topk_keep(score, alive > 0, n0, keep_ratios[l])
            keep = (keep | pos0) & (alive > 0)
            alive = keep.to(x.dtype)
            x = out
    logits = classifier_head(model, x[:, 0])
    return ForwardOutput(logits=logits, embeddings=embeddings, soft_masks=soft_masks, kept_tokens=torch.stack(kept, 1),
                         scores=scores)


def _topk_keep(score: torch.Tensor, present: torch.Tensor, n0: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the ceil(ratio*n0) best-scoring present tokens of each row (position 0 always). [b, s]"""
    k = torch.clamp(torch.ceil(n0.to(torch.float64) * ratio).long(), min=1)  # [b]
    k = torch.minimum(k, present.sum(1))
    ranked = score.masked_fill(~present, -1.0)
    ranked[:, 0] = float("inf")
    order = ranked.argsort(dim=1, descending=True, stable=True)  # [b, s]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order))
    return rank < k[:, None]


def topk_tokens_per_layer(lengths, keep_ratios: list[float]):
    """Tokens entering each layer under top-k pruning, from the lengths alone (what `_topk_keep`
    keeps: ceil(ratio·n0) tokens, at least 1, never more than are present; the last layer prunes
    nothing). [N] -> [N, L] float64 numpy, equal to `forward_packed(..., return_kept=True)`."""
    import numpy as np

    n0 = np.asarray(lengths, dtype=np.float64)
    entering = [n0]
    for ratio in keep_ratios[:-1]:
        entering.append(np.minimum(np.maximum(np.ceil(n0 * ratio), 1.0), entering[-1]))
    return np.stack(entering, axis=1)


# ----------------------------------------------------------------------------- packed path


@torch.no_grad()
def forward_packed(
    model: nn.Module,
    input_ids: torch.Tensor,  # [b, s]
    attention_mask: torch.Tensor,  # [b, s]
    token_type_ids: torch.Tensor | None,
    pruning: PruningConfig,
    *,
    return_kept: bool = False,
) -> ForwardOutput:
    """Inference that removes pruned tokens. Linear layers see only present tokens [T, d]."""
    layers = encoder_layers(model)
    heads = num_heads(model)
    x = embed(model, input_ids, token_type_ids)  # [b, s, d]
    d = x.shape[-1]
    lengths = attention_mask.sum(1)  # [b]
    n0 = lengths
    layout = PackedLayout.from_lengths(lengths)
    x = layout.pack(x[:, : layout.max_len])  # [T, d]
    kept = []
    thresholds = pruning.thresholds
    prune = pruning.mode != "none"
    for l, layer in enumerate(layers):
        if return_kept:
            kept.append(layout.lengths.clone())
        q, k, v = _qkv(layer, x)  # [T, d] each
        b, smax = layout.lengths.shape[0], layout.max_len
        q = _split_heads(layout.unpack(q), heads)  # [b, H, smax, dh]
        k = _split_heads(layout.unpack(k), heads)
        v = _split_heads(layout.unpack(v), heads)
        valid = None if layout.full else layout.valid_mask()  # [b, smax]; None: no padding
        att = _attention_scores(layer, q, k)  # [b, H, smax, smax]
        if valid is not None:
            att = att.masked_fill(~valid[:, None, None, :], torch.finfo(att.dtype).min)
        probs = att.softmax(-1)
        ctx = _attention_context(layer, probs, v).transpose(1, 2).reshape(b * smax, d)  # [b*smax, d]
        if prune and l < len(layers) - 1:
            # the keep decision exists as soon as the softmax does: a token pruned here is never a
            # key/value again and the classifier reads only position 0, so its output projection
            # and FFN rows would be dead work. Drop it now, before them.
            present_probs = probs if valid is None else probs * valid[:, None, :, None]  # padded queries score nothing
            score = present_probs.sum(dim=(1, 2)) / heads  # [b, smax]
            if pruning.mode == "threshold":
                keep = score > thresholds[l]
            else:
                keep = _topk_keep(score, layout.valid_mask(), n0, pruning.keep_ratios[l])
            keep[:, 0] = True
            if valid is not None:
                keep &= valid
            rows = keep.reshape(-1).nonzero().squeeze(1)  # kept rows of the padded [b*smax] layout
            ctx = ctx.index_select(0, rows)  # [T', d]
            x = x.index_select(0, rows) if layout.full else x[layout.pack(keep.unsqueeze(-1)).squeeze(-1)]  # [T', d]
            layout = PackedLayout.from_lengths(keep.sum(1))
        else:
            ctx = layout.pack(ctx)  # [T, d]
        x = _post_attention(layer, ctx, x)  # [T', d]
    logits = classifier_head(model, x[layout.first_rows()])
    return ForwardOutput(logits=logits, kept_tokens=torch.stack(kept, 1) if return_kept else None)


def forward_for_pruning(model: nn.Module, batch, pruning: PruningConfig, *, packed: bool = True, return_kept: bool = False) -> ForwardOutput:
    """Inference forward for a `Batch` under a pruning config (packed by default)."""
    if packed:
        return forward_packed(model, batch.input_ids, batch.attention_mask, batch.token_type_ids, pruning, return_kept=return_kept)
    return forward_masked(model, batch.input_ids, batch.attention_mask, batch.token_type_ids, mode=pruning.masked_mode,
                          thresholds=pruning.thresholds_tensor, keep_ratios=pruning.keep_ratios)
