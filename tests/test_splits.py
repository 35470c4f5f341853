"""The validation split (tasks/splits.py): seeded, sized as asked, leak-free (no training row
contains or is contained in a validation row), pair tasks split by shared texts."""

from __future__ import annotations

import pytest

from ltp_compress.tasks.data import DataConfig, Example, load_split
from ltp_compress.tasks.glue import get_task
from ltp_compress.tasks.splits import carve_validation, load_train_and_validation, normalized

from conftest import DEMO_DATA, MRPC_TINY


def _sst2_like() -> list[Example]:
    """Sentences and their phrases, as in GLUE SST-2's train file (phrases of parse trees)."""
    sentences = [f"the film number {i} is a quiet and lovely {w} piece" for i, w in enumerate(["odd", "warm", "dull", "bold"] * 10)]
    rows = []
    for s in sentences:
        ws = s.split()
        rows.append(Example(s, None, 1))
        rows += [Example(" ".join(ws[a:a + 3]), None, 0) for a in range(0, len(ws) - 2, 2)]
    rows += [Example("lovely", None, 1), Example("a quiet", None, 1), Example("Lovely  ", None, 1)]
    return rows


def _leaks(train: list[Example], validation: list[Example]) -> list[tuple[str, str]]:
    tk = [f" {normalized(e.text_a)} " for e in train]
    vk = [f" {normalized(e.text_a)} " for e in validation]
    return [(t, v) for t in tk for v in vk if t in v or v in t]


def test_single_sentence_split_is_leak_free_and_takes_whole_sentences():
    rows = _sst2_like()
    split = carve_validation(rows, fraction=0.1, max_examples=None, seed=0)
    assert not _leaks(split.train, split.validation)
    assert all(e.text_a.startswith("the film number") for e in split.validation)  # roots: whole sentences, like dev
    assert split.info["dropped_from_train_as_overlapping"] > 0  # their phrases, and "lovely" / "a quiet"
    assert "lovely" not in {normalized(e.text_a) for e in split.train}
    assert len(split.train) + len(split.validation) + split.info["dropped_from_train_as_overlapping"] == len(rows)


def test_negative_control_random_rows_would_leak():
    """The leak check above can fail: a random 10 % of the same rows leaks."""
    import numpy as np

    rows = _sst2_like()
    idx = set(np.random.default_rng(0).permutation(len(rows))[: len(rows) // 10].tolist())
    assert _leaks([r for i, r in enumerate(rows) if i not in idx], [rows[i] for i in idx])


def test_split_is_seeded_and_sized():
    rows = _sst2_like()
    a = carve_validation(rows, fraction=0.1, max_examples=None, seed=3)
    b = carve_validation(rows, fraction=0.1, max_examples=None, seed=3)
    c = carve_validation(rows, fraction=0.1, max_examples=None, seed=4)
    assert [e.text_a for e in a.validation] == [e.text_a for e in b.validation]
    assert [e.text_a for e in a.validation] != [e.text_a for e in c.validation]
    assert len(a.validation) == round(0.1 * len(rows))
    assert len(carve_validation(rows, fraction=0.1, max_examples=5, seed=3).validation) == 5


def test_pair_rows_sharing_a_text_stay_on_one_side():
    rows = [Example(f"premise {i // 3}", f"hypothesis {i}", i % 2) for i in range(60)]  # 3 hypotheses per premise
    rows += [Example("premise 0", "a question also asked elsewhere", 0), Example("x", "hypothesis 7", 1)]
    split = carve_validation(rows, fraction=0.2, max_examples=None, seed=1)
    val_texts = {normalized(t) for e in split.validation for t in (e.text_a, e.text_b)}
    assert not [e for e in split.train if normalized(e.text_a) in val_texts or normalized(e.text_b) in val_texts]
    assert len(split.validation) <= round(0.2 * len(rows))


@pytest.mark.parametrize("task,path", [("sst2", DEMO_DATA), ("mrpc", MRPC_TINY)])
def test_shipped_data(task, path):
    cfg = DataConfig(source="glue_dir", path=str(path), max_train_examples=50, max_validation_examples=40)
    train, validation, info = load_train_and_validation(cfg, get_task(task), seed=0)
    assert len(validation) <= 40 and len(train) == 50 and info["train_examples_used"] == 50
    dev = load_split(cfg, get_task(task), "dev")
    dev_texts = {normalized(e.text_a) for e in dev.examples}
    assert validation.examples and validation.name == "validation" and dev.examples
    if task == "sst2":
        assert not _leaks(train.examples, validation.examples)
    # validation comes from the training file: it is not the dev set
    assert sum(normalized(e.text_a) in dev_texts for e in validation.examples) == 0
