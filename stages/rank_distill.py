"""Ranking distillation (ToP, Li et al. KDD'23, §4.2): the token order of the unpruned teacher's
*final* layer, taught to the pruning layers' importance scores, so that early layers keep the
tokens the deep layers need.

For one example, the teacher's final-layer importance score (`forward_masked(..., return_scores=
True).scores[-1]`, the same normalised score the thresholds compare against) orders its present
tokens; π = that order, best first. Each pruning layer l (`rank_distill_layers`) of the student is
trained so that its own score s_l orders them the same way, with the top-k ListMLE loss (Xia et
al., ICML'08 and NeurIPS'09), the negative log-likelihood of the teacher's first k positions under
a Plackett-Luce model whose item weights are the student's scores:

    loss_l = -1/k · Σ_{i=1..k} log( s_l(π_i) / Σ_{j ∉ {π_1..π_{i-1}}} s_l(j) )       (k = min(topk, n))

i.e. Plackett-Luce logits log s_l: picking a token is its share of the attention the tokens not
yet picked receive — the quantity a threshold on s_l keeps or drops. The loss is scale-free in
s_l (the total attention is fixed anyway) and 0 only when the order is matched with every later
token's share vanishing. ToP itself uses pytorchltr's LambdaARPLoss2 on the teacher's top 20;
ListMLE is a listwise loss with the same target (the teacher's top-k order) and no extra
dependency. The stage loss adds `rank_distill_weight` · mean over layers and examples.

Tokens ranked: the example's real tokens except position 0 ([CLS] / <s>, never pruned), and — in
hard mode — only those still present at layer l (a token pruned earlier has score exactly 0 there:
it cannot be moved and is left out of the list).
"""

from __future__ import annotations

import torch

#: Plackett-Luce logit of a token outside the list: exp(-1e4) is 0 in float32 and no NaN arises
_ABSENT_LOGIT = -1.0e4


def listmle_topk(student_score: torch.Tensor, teacher_score: torch.Tensor, listed: torch.Tensor, topk: int) -> torch.Tensor:
    """Per-example top-k ListMLE of the student's scores against the teacher's order.

    student_score, teacher_score: [b, s] non-negative importance scores; listed: [b, s] bool, the
    tokens in each example's list. Returns [b] (0 for an example with fewer than 2 listed tokens)."""
    listed = listed & (student_score > 0)  # a pruned token's score is exactly 0: not movable, not listed
    n = listed.sum(1)  # [b]
    k = torch.clamp(torch.minimum(n, torch.full_like(n, topk)), min=0)  # [b]
    logits = torch.where(listed, torch.log(student_score.clamp_min(1e-12)), torch.full_like(student_score, _ABSENT_LOGIT))
    order_key = torch.where(listed, teacher_score, torch.full_like(teacher_score, -1.0))  # unlisted last
    order = order_key.argsort(dim=1, descending=True, stable=True)  # [b, s] teacher order, best first
    g = logits.gather(1, order)  # [b, s] student logits in teacher order
    suffix_lse = torch.logcumsumexp(g.flip(1), dim=1).flip(1)  # [b, s] log Σ_{j >= i} exp(g_j)
    position = torch.arange(g.shape[1], device=g.device)[None, :]
    in_top = position < k[:, None]  # [b, s]
    nll = torch.where(in_top, suffix_lse - g, torch.zeros_like(g)).sum(1)  # [b]
    loss = nll / k.clamp_min(1).to(nll.dtype)
    return torch.where(n >= 2, loss, torch.zeros_like(loss))


def listmle_topk_reference(student_score, teacher_score, listed, topk: int) -> list[float]:
    """Plain-Python ListMLE, one example at a time (the test compares `listmle_topk` with it)."""
    import math

    out = []
    for s_row, t_row, l_row in zip(student_score.tolist(), teacher_score.tolist(), listed.tolist()):
        items = [i for i, on in enumerate(l_row) if on and s_row[i] > 0]
        if len(items) < 2:
            out.append(0.0)
            continue
        order = sorted(items, key=lambda i: (-t_row[i], i))
        k = min(topk, len(order))
        nll = 0.0
        for pos in range(k):
            rest = order[pos:]
            nll -= math.log(s_row[order[pos]] / sum(s_row[j] for j in rest))
        out.append(nll / k)
    return out


def rank_distill_loss(student_scores: list[torch.Tensor], teacher_final_score: torch.Tensor, attention_mask: torch.Tensor,
                      layers: list[int], topk: int) -> torch.Tensor:
    """Mean over `layers` and the batch of `listmle_topk`(student layer l, teacher's final layer).

    student_scores: per layer [b, s] (`ForwardOutput.scores`); teacher_final_score: [b, s];
    attention_mask: [b, s] (1 = real token)."""
    listed = attention_mask.bool().clone()
    listed[:, 0] = False  # [CLS] / <s> is never pruned: not ranked
    target = teacher_final_score.detach()
    per_layer = [listmle_topk(student_scores[l].float(), target.float(), listed, topk).mean() for l in layers]
    return torch.stack(per_layer).mean()


def pruning_layers(num_layers: int, layers: list[int] | None) -> list[int]:
    """The layers whose scores are distilled: `layers` as configured, or every layer that prunes
    (0 .. L-2; the last layer's score decides nothing)."""
    return list(range(num_layers - 1)) if layers is None else list(layers)
