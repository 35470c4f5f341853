"""Results by input length, the LTP paper's length-robustness protocol (Table III): an evaluated split
cut by its own token-length quartiles into `short` (n ≤ Q2, the short half), `q2_q3` (Q2 < n ≤ Q3) and
`long` (n > Q3), each with the task metrics and the relative FLOPs (both conventions) of its rows.

Computed from the per-example predictions, lengths and tokens entering each layer of the evaluation
pass that gives the split's own metrics and cost (`stages/common.py` `evaluate`): no second forward
pass. The FLOPs come from `modeling/accounting.py` (`relative_flops_by_group`, the same per-example
count as the split's cost), so the split's relative FLOPs is Σ_slice dense_flops_share · relative_flops
(each convention). A stage's meta.json holds it per evaluated split at `metrics[<split>]["by_length"]`.
"""

from __future__ import annotations

import numpy as np

from ltp_compress.modeling.accounting import EncoderShape, relative_flops_by_group
from ltp_compress.tasks.metrics import compute_metrics

#: slice names, shortest first
SLICES = ("short", "q2_q3", "long")
#: where a stage's meta.json keeps them: metrics[<split>][BY_LENGTH]
BY_LENGTH = "by_length"


def slice_rows(lengths: np.ndarray) -> tuple[float, float, dict[str, np.ndarray]]:
    """(Q2, Q3, {slice: row indices}) of a split's token counts (numpy's linear quantiles); the
    slices partition the rows: short n ≤ Q2, q2_q3 Q2 < n ≤ Q3, long n > Q3."""
    lengths = np.asarray(lengths)
    q2, q3 = (float(np.quantile(lengths, q)) for q in (0.5, 0.75))
    masks = {"short": lengths <= q2, "q2_q3": (lengths > q2) & (lengths <= q3), "long": lengths > q3}
    return q2, q3, {name: np.flatnonzero(m) for name, m in masks.items()}


def length_slices(task, predictions: np.ndarray, labels: np.ndarray, kept_tokens: np.ndarray, lengths: np.ndarray,
                  shape: EncoderShape) -> dict:
    """The `by_length` entry of one evaluated split: boundaries, and per slice its example count,
    token range, task metrics (None when empty) and relative FLOPs in both conventions with its share
    of the split's unpruned FLOPs. `predictions` as `compute_metrics` takes them; [N] arrays but
    `kept_tokens` [N, L]."""
    predictions, labels, lengths = np.asarray(predictions), np.asarray(labels), np.asarray(lengths)
    if task.num_labels != 1:
        predictions = predictions.astype(np.int64)
    q2, q3, rows = slice_rows(lengths)
    flops = relative_flops_by_group(kept_tokens, lengths, shape, rows)
    slices = {}
    for name in SLICES:
        idx = rows[name]
        ln = lengths[idx]
        slices[name] = {
            "num_examples": int(len(idx)),
            "min_tokens": int(ln.min()) if len(idx) else None,
            "max_tokens": int(ln.max()) if len(idx) else None,
            "mean_tokens": float(ln.mean()) if len(idx) else None,
            "metrics": compute_metrics(task, predictions[idx], labels[idx]) if len(idx) else None,
            **flops[name],
        }
    return {"boundaries": {"q2_tokens": q2, "q3_tokens": q3}, "quantile_method": "numpy linear",
            "rule": "short: n <= Q2; q2_q3: Q2 < n <= Q3; long: n > Q3 (n: tokens incl. special tokens, as evaluated)",
            "num_examples": int(len(lengths)), "slices": slices}
