"""GLUE metrics in pure numpy (no sklearn / scipy).

All values are plain Python floats. Accuracy and F1 are fractions in [0, 1]; Matthews
correlation, Pearson and Spearman are in [-1, 1]. Degenerate inputs (a constant prediction
vector for a correlation, no positives at all for F1) return 0.0 instead of NaN so model
selection never compares against NaN; this matches sklearn's ``zero_division=0`` / MCC
conventions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .glue import TaskSpec

__all__ = [
    "accuracy",
    "f1",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "rankdata",
    "compute_metrics",
    "trivial_baseline",
]

ArrayLike = Sequence | np.ndarray


def _pair(predictions: ArrayLike, labels: ArrayLike, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predictions, dtype=dtype).reshape(-1)
    y = np.asarray(labels, dtype=dtype).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({y.size}) differ in length")
    if p.size == 0:
        raise ValueError("cannot compute a metric on zero examples")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """Binary F1 of class ``positive``: 2TP / (2TP + FP + FN); 0.0 when that is 0/0."""
    p, y = _pair(predictions, labels)
    pp, yp = p == positive, y == positive
    tp = float(np.sum(pp & yp))
    fp = float(np.sum(pp & ~yp))
    fn = float(np.sum(~pp & yp))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K; equals the phi coefficient for 2 classes).

    With confusion matrix C, t_k = row sums (true), p_k = column sums (predicted), c = trace,
    s = total:  MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2) (s^2 - sum t_k^2)).
    Returns 0.0 when the denominator is 0 (e.g. one class predicted for everything).
    """
    p, y = _pair(predictions, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    yi, pi = inv[: y.size], inv[y.size :]
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (yi, pi), 1.0)
    t = cm.sum(axis=1)
    pr = cm.sum(axis=0)
    c = np.trace(cm)
    s = cm.sum()
    cov_ytyp = c * s - float(np.dot(t, pr))
    cov_ypyp = s * s - float(np.dot(pr, pr))
    cov_ytyt = s * s - float(np.dot(t, t))
    denom = cov_ytyt * cov_ypyp
    if denom <= 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(denom))


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; 0.0 when either input is constant."""
    p, y = _pair(predictions, labels, dtype=np.float64)
    pc, yc = p - p.mean(), y - y.mean()
    denom = np.sqrt(np.dot(pc, pc) * np.dot(yc, yc))
    if denom == 0 or not np.isfinite(denom):
        return 0.0
    return float(np.clip(np.dot(pc, yc) / denom, -1.0, 1.0))


def rankdata(x: ArrayLike) -> np.ndarray:
    """1-based ranks with ties given the average of the ranks they span (scipy 'average')."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # boundaries of runs of equal values
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [a.size]])  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    p, y = _pair(predictions, labels, dtype=np.float64)
    return pearson(rankdata(p), rankdata(y))


def _as_class_ids(predictions: ArrayLike) -> np.ndarray:
    p = np.asarray(predictions)
    if p.ndim == 2:  # logits / probabilities -> argmax
        p = p.argmax(axis=-1)
    return p.reshape(-1)


def compute_metrics(task: "TaskSpec", predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """All of ``task.metrics`` plus ``"main"`` (= the value of ``task.main_metric``).

    Classification: ``predictions`` are class ids (a 2-D array of logits is argmax-ed).
    Regression (``task.num_labels == 1``): ``predictions`` are floats (shape [n] or [n, 1]).
    Derived metrics: ``f1_acc`` = (f1 + accuracy) / 2, ``pearson_spearman`` = (pearson + spearman) / 2.
    """
    out: dict[str, float] = {}
    if task.num_labels == 1:
        p = np.asarray(predictions, dtype=np.float64).reshape(-1)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
    else:
        p = _as_class_ids(predictions)
        y = np.asarray(labels).reshape(-1)
    cache: dict[str, float] = {}

    def get(name: str) -> float:
        if name not in cache:
            if name == "accuracy":
                cache[name] = accuracy(p, y)
            elif name == "f1":
                cache[name] = f1(p, y)
            elif name in ("mcc", "matthews_corrcoef"):
                cache[name] = matthews_corrcoef(p, y)
            elif name == "pearson":
                cache[name] = pearson(p, y)
            elif name == "spearman":
                cache[name] = spearman(p, y)
            elif name == "f1_acc":
                cache[name] = (get("f1") + get("accuracy")) / 2.0
            elif name == "pearson_spearman":
                cache[name] = (get("pearson") + get("spearman")) / 2.0
            else:
                raise ValueError(f"unknown metric {name!r}")
        return cache[name]

    for name in task.metrics:
        out[name] = get(name)
    out["main"] = get(task.main_metric)
    return out


def trivial_baseline(task: "TaskSpec", train_labels: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Metrics of the trivial predictor fitted on the training labels: the majority class
    (classification) or the mean label (regression), predicted for every example. A model whose
    score is not clearly above this learned nothing. (Correlations of a constant are 0 by the
    convention above.)"""
    y_train = np.asarray(train_labels)
    n = len(np.asarray(labels))
    if task.num_labels == 1:
        constant = float(np.mean(y_train.astype(np.float64)))
        what = f"mean label {constant:.4g}"
    else:
        values, counts = np.unique(y_train.astype(np.int64), return_counts=True)
        constant = int(values[np.argmax(counts)])
        what = f"majority class {constant}" + (f" ({task.label_names[constant]})" if task.label_names else "")
    metrics = compute_metrics(task, np.full(n, constant), labels)
    metrics["predictor"] = what
    return metrics
