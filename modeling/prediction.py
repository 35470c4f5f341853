"""`predict` for deployed models of any runtime (torch DeployedModel, onnxruntime OnnxDeployedModel):
batches texts by length, keeps the input order, turns logits into labels and scores. Light (numpy).

`check_texts` is the one input check of every front end (`ltp-compress predict`, `ltp-compress serve`):
empty texts and a pair given to a single-sentence model (or the reverse) are refused with a message
naming the input; `predict_groups(..., details=True)` adds to each result the tokens the model read,
the truncation (tokens before truncation and max_seq_length) and the tokens kept at each layer."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ltp_compress.errors import UserError


class InputError(UserError, ValueError):
    """A text the model cannot classify as given (empty, a pair for a single-sentence model, ...)."""


def check_texts(pairs: Sequence[tuple[str, str | None]], expects_pair: bool | None, where) -> list[str]:
    """Problems of (text_a, text_b) inputs, one message per bad input ('' for none is not returned):
    `where(i)` names input i (e.g. 'line 3', 'texts[2]'). `expects_pair`: None when the model's task
    is unknown (then both kinds are accepted)."""
    problems = []
    for i, (a, b) in enumerate(pairs):
        if not a.strip() or (b is not None and not b.strip()):
            problems.append(f"{where(i)}: empty text" + (" (one side of the pair is empty)" if b is not None else ""))
        elif expects_pair is True and b is None:
            problems.append(f"{where(i)}: this model classifies sentence pairs; give two texts")
        elif expects_pair is False and b is not None:
            problems.append(f"{where(i)}: this model classifies single sentences; got a pair")
    return problems


def length_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Input indices sorted by length (longest first) and cut into groups of at most batch_size."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    step = max(1, int(batch_size))
    return [order[s:s + step] for s in range(0, len(order), step)]


def predict_texts(model, texts_a, texts_b=None, batch_size: int = 32, details: bool = False) -> list[dict]:
    """[{"label": name, "score": probability of that label}] per input (regression:
    {"label": "score", "score": value}). `model` has encode(texts_a, texts_b), logits_many(batches) (an
    array-like [b, C] per batch), num_labels and id2label. Inputs are batched by length; order is kept.
    details: see predict_groups."""
    texts_a = [texts_a] if isinstance(texts_a, str) else list(texts_a)
    if isinstance(texts_b, str):
        texts_b = [texts_b]
    if texts_b is not None and len(texts_b) != len(texts_a):
        raise ValueError(f"texts_b has {len(texts_b)} entries, texts_a {len(texts_a)}")
    lens = [len(a) + (len(texts_b[i]) if texts_b is not None else 0) for i, a in enumerate(texts_a)]
    return predict_groups(model, texts_a, texts_b, length_groups(lens, batch_size), details)


def predict_groups(model, texts_a: list[str], texts_b: list[str] | None, groups: list[list[int]], details: bool = False) -> list[dict]:
    """predict_texts on given batches (`groups`: lists of input indices covering every input once).
    details: each result also has "tokens" (read by the model, special tokens included),
    "truncation" (None, or {"tokens_before_truncation", "max_seq_length"}) and "kept_tokens" (per
    layer, tokens entering it; the runtimes' last_kept_tokens)."""
    if not texts_a:
        return []
    results: list[dict | None] = [None] * len(texts_a)
    encoded = [model.encode([texts_a[i] for i in idx], None if texts_b is None else [texts_b[i] for i in idx]) for idx in groups]
    outs = model.logits_many(encoded)  # the runtime may run several batches at once
    kept = np.asarray(model.last_kept_tokens) if details and getattr(model, "last_kept_tokens", None) is not None else None
    row = 0
    for idx, out, enc in zip(groups, outs, encoded):
        lg = np.asarray(out, dtype=np.float64)  # [b, C]
        if model.num_labels == 1:
            found = [({"label": model.id2label.get(0, "score"), "score": float(lg[j, 0])}) for j in range(len(idx))]
        else:
            z = np.exp(lg - lg.max(-1, keepdims=True))
            probs = z / z.sum(-1, keepdims=True)
            found = []
            for j in range(len(idx)):
                c = int(probs[j].argmax())
                found.append({"label": model.id2label.get(c, str(c)), "score": float(probs[j, c])})
        if details:
            tokens = np.asarray(enc["attention_mask"]).sum(-1).tolist()
            for j, i in enumerate(idx):
                found[j]["tokens"] = int(tokens[j])
                found[j]["truncation"] = _truncation(model, texts_a[i], None if texts_b is None else texts_b[i], int(tokens[j]))
                found[j]["kept_tokens"] = [int(k) for k in kept[row + j]] if kept is not None and row + j < len(kept) else None
        for j, i in enumerate(idx):
            results[i] = found[j]
        row += len(idx)
    return results  # type: ignore[return-value]


def _truncation(model, a: str, b: str | None, tokens: int) -> dict | None:
    """None unless the input filled max_seq_length; then its untruncated length is counted."""
    if tokens < model.max_seq_length:
        return None
    before = untruncated_length(model, a, b)
    return None if before <= model.max_seq_length else {"tokens_before_truncation": before, "max_seq_length": model.max_seq_length}


def untruncated_length(model, a: str, b: str | None) -> int:
    """Tokens of the input with special tokens and no truncation (the runtime's own tokenizer, either
    a `tokenizers.Tokenizer` (onnxruntime) or a Hugging Face fast tokenizer (torch))."""
    cached = getattr(model, "_untruncated_tokenizer", None)
    if cached is None:
        from tokenizers import Tokenizer

        tok = model.tokenizer if isinstance(model.tokenizer, Tokenizer) else model.tokenizer.backend_tokenizer
        cached = Tokenizer.from_str(tok.to_str())  # a copy: the runtime's own keeps its truncation and padding
        cached.no_truncation()
        cached.no_padding()
        model._untruncated_tokenizer = cached
    return len(cached.encode(a, b).ids)
