"""`predict` for deployed models of any runtime (torch DeployedModel, onnxruntime OnnxDeployedModel):
batches texts by length, keeps the input order, turns logits into labels and scores. Light (numpy)."""

from __future__ import annotations

import numpy as np


def predict_texts(model, texts_a, texts_b=None, batch_size: int = 32) -> list[dict]:
    """[{"label": name, "score": probability of that label}] per input (regression:
    {"label": "score", "score": value}). `model` has encode(texts_a, texts_b), logits_many(batches) (an
    array-like [b, C] per batch), num_labels and id2label. Inputs are batched by length; order is kept."""
    texts_a = [texts_a] if isinstance(texts_a, str) else list(texts_a)
    if isinstance(texts_b, str):
        texts_b = [texts_b]
    if texts_b is not None and len(texts_b) != len(texts_a):
        raise ValueError(f"texts_b has {len(texts_b)} entries, texts_a {len(texts_a)}")
    if not texts_a:
        return []
    lens = [len(a) + (len(texts_b[i]) if texts_b is not None else 0) for i, a in enumerate(texts_a)]
    order = sorted(range(len(texts_a)), key=lambda i: -lens[i])
    results: list[dict | None] = [None] * len(texts_a)
    groups = [order[s:s + max(1, batch_size)] for s in range(0, len(order), max(1, batch_size))]
    encoded = [model.encode([texts_a[i] for i in idx], None if texts_b is None else [texts_b[i] for i in idx]) for idx in groups]
    for idx, out in zip(groups, model.logits_many(encoded)):  # the runtime may run several batches at once
        lg = np.asarray(out, dtype=np.float64)  # [b, C]
        if model.num_labels == 1:
            for j, i in enumerate(idx):
                results[i] = {"label": model.id2label.get(0, "score"), "score": float(lg[j, 0])}
            continue
        z = np.exp(lg - lg.max(-1, keepdims=True))
        probs = z / z.sum(-1, keepdims=True)
        for j, i in enumerate(idx):
            c = int(probs[j].argmax())
            results[i] = {"label": model.id2label.get(c, str(c)), "score": float(probs[j, c])}
    return results  # type: ignore[return-value]
