"""The validation split: carved from train, seeded, leak-free. It makes every choice (best
checkpoint, λ steering, FLOPs calibration, INT8 fallback); the dev set is evaluated, never chosen on.

Leak-free means: no training row contains, or is contained in, a validation row (texts compared
after lower-casing and collapsing whitespace, at word boundaries).

* Single-sentence tasks (SST-2, CoLA). GLUE SST-2's train rows are the phrases of parse trees:
  most short rows occur inside longer rows of the same sentence, and a random split would put a
  sentence's phrases on both sides. So validation rows are drawn only among *root* rows (rows
  contained in no other row: whole sentences, like dev), and every training row contained in a
  validation row (its phrases, and any other phrase that occurs in it) is dropped from train.
  A root is contained in no other row, so no training row can contain it.
* Pair tasks (MRPC, QQP, MNLI, ...). Rows that share a text (either side: MNLI premises, QQP
  questions) are connected; validation takes whole connected groups (of at most
  `_MAX_PAIR_GROUP` rows, so one popular question cannot take the whole budget), so no validation
  text occurs in a training row.

Size: `validation_fraction` of the train rows, at most `max_validation_examples` (DataConfig).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .data import DataConfig, DataError, Example, SplitData, TokenizedSplit, load_split, seeded_subset
from .glue import TaskSpec

_MAX_PAIR_GROUP = 50


@dataclass
class ValidationSplit:
    train: list[Example]
    validation: list[Example]
    info: dict  # method, sizes, rows dropped from train because they overlap validation


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def carve_validation(examples: list[Example], *, fraction: float, max_examples: int | None, seed: int) -> ValidationSplit:
    """Split `examples` (the full training file, in file order) into train and validation."""
    if not examples:
        raise DataError("cannot carve a validation split from an empty training set")
    target = max(1, int(round(fraction * len(examples))))
    if max_examples is not None:
        target = min(target, max_examples)
    order = np.random.default_rng(seed).permutation(len(examples))
    is_pair = examples[0].text_b is not None
    if is_pair:
        val_rows, dropped, method = _pair_groups(examples, order, target)
    else:
        val_rows, dropped, method = _single_roots(examples, order, target)
    if not val_rows:
        raise DataError(f"could not carve a leak-free validation split of {target} rows from {len(examples)} training rows")
    val_set = set(val_rows)
    train = [e for i, e in enumerate(examples) if i not in val_set and i not in dropped]
    validation = [examples[i] for i in sorted(val_rows)]
    if not train:
        raise DataError("carving the validation split left no training rows (lower data.validation_fraction)")
    info = {"method": method, "seed": seed, "requested": target, "validation_examples": len(validation),
            "train_examples": len(train), "dropped_from_train_as_overlapping": len(dropped),
            "source_train_rows": len(examples)}
    return ValidationSplit(train, validation, info)


def _single_roots(examples: list[Example], order: np.ndarray, target: int) -> tuple[list[int], set[int], str]:
    keys = [normalized(e.text_a) for e in examples]
    words = [k.split() for k in keys]
    index: dict[str, list[int]] = defaultdict(list)  # word -> rows holding it
    for i, ws in enumerate(words):
        for w in set(ws):
            index[w].append(i)
    same_text: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        same_text[k].append(i)

    def is_root(i: int) -> bool:
        """Contained in no longer row (the rarest word's rows are the only candidates)."""
        if not words[i]:
            return False
        needle = f" {keys[i]} "
        rare = min(set(words[i]), key=lambda w: len(index[w]))
        return not any(len(words[j]) > len(words[i]) and needle in f" {keys[j]} " for j in index[rare])

    chosen: list[int] = []
    taken: set[str] = set()
    for i in order:
        if len(chosen) >= target:
            break
        k = keys[i]
        if k in taken or not is_root(int(i)):
            continue
        taken.add(k)
        chosen.append(int(i))
        # identical rows (same text) are the same example: they go to validation together
        chosen += [j for j in same_text[k] if j != i]
    # every contiguous word sequence of a validation row: a training row equal to one is contained in it
    inside: set[str] = set()
    for i in chosen:
        ws = words[i]
        for a in range(len(ws)):
            for b in range(a + 1, len(ws) + 1):
                inside.add(" ".join(ws[a:b]))
    chosen_set = set(chosen)
    dropped = {i for i, k in enumerate(keys) if i not in chosen_set and k in inside}
    return chosen, dropped, "root sentences (rows contained in no other row); training rows inside them dropped"


def _pair_groups(examples: list[Example], order: np.ndarray, target: int) -> tuple[list[int], set[int], str]:
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_row: dict[str, int] = {}
    for i, e in enumerate(examples):
        for text in (e.text_a, e.text_b):
            k = normalized(text or "")
            if k in first_row:
                ra, rb = find(i), find(first_row[k])
                if ra != rb:
                    parent[ra] = rb
            else:
                first_row[k] = i
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(examples)):
        groups[find(i)].append(i)
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order:
        if len(chosen) >= target:
            break
        g = find(int(i))
        if g in seen:
            continue
        seen.add(g)
        if len(groups[g]) <= _MAX_PAIR_GROUP and len(chosen) + len(groups[g]) <= target:
            chosen += groups[g]
    return chosen, set(), f"whole groups of pairs sharing a text (groups of at most {_MAX_PAIR_GROUP} rows)"


def load_train_and_validation(cfg: DataConfig, task: TaskSpec, seed: int) -> tuple[SplitData, SplitData, dict]:
    """(train, validation, info): the validation split is carved from the whole training file,
    then `max_train_examples` takes a seeded subset of the remaining training rows."""
    full = load_split(cfg.model_copy(update={"max_train_examples": None}), task, "train", seed=seed)
    split = carve_validation(full.examples, fraction=cfg.validation_fraction, max_examples=cfg.max_validation_examples, seed=seed)
    train = seeded_subset(split.train, cfg.max_train_examples, seed)
    info = {**split.info, "train_examples_used": len(train)}
    return (SplitData("train", train, full.skipped, full.source),
            SplitData("validation", split.validation, 0, f"{full.source} (carved: {split.info['method']})"), info)


#: the recipe key of `train_shorter_than` (named in its errors)
SHORTER_THAN_KEY = "data.train_shorter_than_quantile"


def train_shorter_than(train: TokenizedSplit, validation: TokenizedSplit, quantile: float,
                       max_seq_length: int | None = None) -> tuple[TokenizedSplit, dict]:
    """The training rows whose token count (special tokens included, after truncation: the arrays'
    lengths) is below `quantile` of the validation split's token counts (numpy's linear quantile:
    0.5 is the usual median), in their order, and what was done (the threshold, counts and mean
    tokens before / after). Train on short inputs, evaluate on all lengths: the LTP paper's
    length-robustness protocol (Table III). No row left is a DataError naming the recipe key.

    `max_seq_length`: a kept row shorter than it cannot have been cut, so the filtered split's
    truncated count is 0 when every kept row is (None otherwise: unknown)."""
    val_lengths = validation.lengths
    if not len(val_lengths):
        raise DataError(f"{SHORTER_THAN_KEY}: the validation split is empty")
    threshold = float(np.quantile(val_lengths, quantile))
    lengths = train.lengths
    keep = np.flatnonzero(lengths < threshold)
    if not len(keep):
        raise DataError(f"{SHORTER_THAN_KEY}: {quantile:g} leaves no training example: the {quantile:g} quantile of the validation "
                        f"token counts is {threshold:g} tokens and the shortest of the {len(lengths)} training examples has "
                        f"{int(lengths.min())} (raise the quantile)")
    truncated = 0 if max_seq_length is not None and int(lengths[keep].max()) < max_seq_length else None
    info = {"key": SHORTER_THAN_KEY, "quantile": float(quantile), "of": "validation", "quantile_method": "numpy linear",
            "threshold_tokens": threshold, "rule": "tokens < threshold (special tokens included, after truncation)",
            "train_examples_before": int(len(lengths)), "train_examples_after": int(len(keep)),
            "mean_tokens_before": float(lengths.mean()), "mean_tokens_after": float(lengths[keep].mean()),
            "max_tokens_after": int(lengths[keep].max())}
    return train.subset(keep, truncated=truncated), info
