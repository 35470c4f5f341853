"""Tokenisation cache (tasks/token_cache.py): hits equal fresh tokenisation, every key input
misses when changed, damaged entries are rebuilt, batches are unchanged."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ltp_compress.tasks import token_cache as tc
from ltp_compress.tasks.data import (DataConfig, length_bucketed_batches, load_split, mean_tokens,
                                     tokenize_split)
from ltp_compress.tasks.glue import get_task

from conftest import MRPC_TINY


@pytest.fixture(scope="module")
def tok(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


@pytest.fixture()
def data(tmp_path) -> Path:
    d = tmp_path / "mrpc"
    shutil.copytree(MRPC_TINY, d)
    return d


MRPC = get_task("mrpc")


def cfg_for(d: Path, **kw) -> DataConfig:
    return DataConfig(source="glue_dir", path=str(d), **kw)


def load(cfg, cache, tok, split="train", seed=0, loader=None):
    """One split through the cache, the runner's entry point (one entry per split: label=split)."""
    loader = loader or (lambda: ({split: load_split(cfg, MRPC, split, seed=seed)}, {}))
    splits, info = tc.load_splits_cached(cfg, MRPC, tok, seed=seed, cache_dir=cache, loader=loader, label=split,
                                         progress=False)
    return splits[split], info


def assert_same_rows(a, b) -> None:
    """Equality of two tokenised splits: every array, its dtype, the name, the label count."""
    assert len(a) == len(b) and a.num_labels == b.num_labels and a.name == b.name
    for name in ("ids", "offsets", "types", "labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_hit_equals_fresh_tokenisation_and_skips_the_data_file(data, tmp_path, tok):
    cfg, cache = cfg_for(data), tmp_path / "cache"
    fresh = tokenize_split(load_split(cfg, MRPC, "train", seed=0), tok, cfg.max_seq_length, num_labels=2)
    cold, info0 = load(cfg, cache, tok)
    assert not info0.hit and info0.path and Path(info0.path).is_dir()
    assert_same_rows(cold, fresh)
    assert (fresh.types == 1).any()  # pairs: type ids matter

    def no_reading():
        raise AssertionError("a cache hit must not parse the data file")

    warm, info1 = load(cfg, cache, tok, loader=no_reading)
    assert info1.hit and info1.path == info0.path and info1.split("train")["source"] == str(data / "train.tsv")
    assert_same_rows(warm, fresh)
    for name in ("ids", "offsets", "types", "labels"):  # memory-mapped, read-only, identical
        assert isinstance(getattr(warm, name), np.memmap)
        assert np.array_equal(getattr(warm, name), getattr(cold, name))
    assert mean_tokens(warm) == pytest.approx(mean_tokens(fresh))
    # every file is a plain .npy: loads without pickle
    for f in Path(info1.path).glob("*.npy"):
        np.load(f, allow_pickle=False)
    header = json.loads((Path(info1.path) / "header.json").read_text())
    assert header["splits"]["train"]["rows"] == len(fresh) and header["key_doc"]["label"] == "train"


def test_key_inputs_miss_when_changed(data, tmp_path, tok, tiny_roberta):
    from transformers import AutoTokenizer

    cfg, cache = cfg_for(data), tmp_path / "cache"
    _, base = load(cfg, cache, tok)
    assert load(cfg, cache, tok)[1].hit

    # same bytes elsewhere (moved folder): still a hit, the key is the content
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert load(cfg_for(moved), cache, tok)[1].path == base.path

    # the file changes, same size and same mtime: a content hash sees it
    f = data / "train.tsv"
    st = f.stat()
    raw = f.read_bytes()
    i = raw.index(b"Genentech")
    f.write_bytes(raw[:i] + b"Genentach" + raw[i + 9:])
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    ts, info = load(cfg, cache, tok)
    assert not info.hit and info.path != base.path
    assert_same_rows(ts, tokenize_split(load_split(cfg, MRPC, "train"), tok, 128, num_labels=2))

    # max_seq_length, a row-selecting data field, the subset seed, the split, the tokenizer
    variants = [
        (cfg_for(data, max_seq_length=16), tok, 0, "train"),
        (cfg_for(data, max_train_examples=50), tok, 0, "train"),
        (cfg_for(data, max_train_examples=50), tok, 1, "train"),
        (cfg, tok, 0, "dev"),
    ]
    other_tok = AutoTokenizer.from_pretrained(tiny_roberta)  # the same vocab.txt saved in another folder
    lower = AutoTokenizer.from_pretrained(tiny_roberta, do_lower_case=False)
    variants += [(cfg, lower, 0, "train")]
    paths = {info.path}
    for c, t, seed, split in variants:
        ts, inf = load(c, cache, t, split=split, seed=seed)
        assert not inf.hit, (c, split, seed)
        paths.add(inf.path)
        assert load(c, cache, t, split=split, seed=seed)[1].hit
    assert len(paths) == len(variants) + 1
    assert int(load(cfg_for(data, max_seq_length=16), cache, tok)[0].lengths.max()) <= 16
    # an identical tokenizer loaded from another folder (same files) hits
    assert tc.tokenizer_fingerprint(other_tok) == tc.tokenizer_fingerprint(tok)
    # calling the tokenizer (which changes its truncation state) does not change its identity
    fp = tc.tokenizer_fingerprint(tok)
    tok(["a b c"], truncation=True, max_length=9)
    assert tc.tokenizer_fingerprint(tok) == fp


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "missing"])
def test_damaged_entry_is_detected_and_rebuilt(data, tmp_path, tok, caplog, damage):
    cfg, cache = cfg_for(data), tmp_path / "cache"
    ref, info = load(cfg, cache, tok)
    ref_ids = np.array(ref.ids)
    entry = Path(info.path)
    target = entry / "train.ids.npy"
    if damage == "truncate":
        with open(target, "r+b") as fh:
            fh.truncate(target.stat().st_size - 7)
    elif damage == "flip":  # same size, one token id changed
        raw = bytearray(target.read_bytes())
        raw[-3] ^= 0x01
        target.write_bytes(bytes(raw))
    elif damage == "header":
        (entry / "header.json").write_text("{not json")
    else:
        (entry / "train.offsets.npy").unlink()
    del ref
    with caplog.at_level(logging.WARNING, logger="ltp_compress.tasks.token_cache"):
        ts, info2 = load(cfg, cache, tok)
    assert not info2.hit and info2.rebuilt_reason
    assert any("corrupt" in r.getMessage() and str(entry) in r.getMessage() for r in caplog.records)
    assert np.array_equal(np.asarray(ts.ids), ref_ids)
    assert load(cfg, cache, tok)[1].hit  # the rebuilt entry is good
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp / trash folders left


def test_batches_from_cached_split_equal_uncached(data, tmp_path, tok):
    cfg, cache = cfg_for(data), tmp_path / "cache"
    fresh = tokenize_split(load_split(cfg, MRPC, "train"), tok, 128, num_labels=2)
    load(cfg, cache, tok)
    mapped, info = load(cfg, cache, tok)
    assert info.hit and isinstance(mapped.ids, np.memmap)
    for shuffle in (True, False):
        a = length_bucketed_batches(mapped, 8, shuffle=shuffle, seed=3, pad_token_id=0)
        b = length_bucketed_batches(fresh, 8, shuffle=shuffle, seed=3, pad_token_id=0)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            for name in ("input_ids", "attention_mask", "token_type_ids", "labels", "index"):
                tx, ty = getattr(x, name), getattr(y, name)
                assert tx.dtype == ty.dtype and torch.equal(tx, ty), name


def test_regression_labels_and_rows_without_a_file(tmp_path, tok):
    """STS-B style float labels; a source without a file (the hub) is keyed by its rows' hash."""
    from ltp_compress.tasks.data import Example, SplitData

    stsb, cfg = get_task("stsb"), DataConfig(source="hub", max_seq_length=32)
    rows = [Example(f"sentence {i} is here", f"other {i}", float(i) / 7) for i in range(40)]

    def load_rows(rows):
        splits, _ = tc.load_splits_cached(cfg, stsb, tok, seed=0, cache_dir=tmp_path, progress=False,
                                          loader=lambda: ({"train": SplitData("train", rows, 0, "mem")}, {}))
        return splits["train"]

    fresh = tokenize_split(SplitData("train", rows, 0, "mem"), tok, 32)
    a, b = load_rows(rows), load_rows(rows)
    assert a.num_labels == 1 and a.labels.dtype == np.float64 and isinstance(b.ids, np.memmap)
    assert_same_rows(b, fresh)
    assert len(list(tmp_path.iterdir())) == 1  # the second call hit the first call's entry
    changed = [*rows[:3], Example("a changed sentence", "other 3", 3 / 7), *rows[4:]]
    c = load_rows(changed)
    assert len(list(tmp_path.iterdir())) == 2 and not np.array_equal(c.ids, b.ids)
    nocache, info = tc.load_splits_cached(cfg_for(MRPC_TINY), MRPC, tok, seed=0, cache_dir=None, progress=False,
                                          loader=lambda: ({"dev": load_split(cfg_for(MRPC_TINY), MRPC, "dev")}, {}))
    assert info.path is None and not info.hit and len(nocache["dev"]) == 100


def test_missing_file_names_it(tmp_path, tok):
    from ltp_compress.tasks.data import DataError

    with pytest.raises(DataError, match="train.tsv"):
        load(cfg_for(tmp_path), tmp_path / "cache", tok)


def test_all_splits_in_one_entry_with_loader_extra(data, tmp_path, tok):
    """The runner's form: a loader returns every split (here train carved into train/validation,
    plus dev) and an `extra` dict; a hit calls no loader and returns the same rows, the recorded
    sources, skipped and truncated counts, and the extra."""
    cfg, cache = cfg_for(data, max_seq_length=24), tmp_path / "cache"
    calls = []

    def loader():
        calls.append(1)
        full = load_split(cfg, MRPC, "train", seed=0)
        from ltp_compress.tasks.data import SplitData

        raw = {"train": SplitData("train", full.examples[20:], full.skipped, full.source),
               "validation": SplitData("validation", full.examples[:20], 0, full.source + " (carved)"),
               "dev": load_split(cfg, MRPC, "dev", seed=0)}
        return raw, {"carving": {"validation_examples": 20}}

    a, info_a = tc.load_splits_cached(cfg, MRPC, tok, seed=0, cache_dir=cache, loader=loader, progress=False)
    b, info_b = tc.load_splits_cached(cfg, MRPC, tok, seed=0, cache_dir=cache, loader=loader, progress=False)
    assert calls == [1] and not info_a.hit and info_b.hit and info_a.path == info_b.path
    assert list(b) == ["train", "validation", "dev"] and info_b.extra == {"carving": {"validation_examples": 20}}
    raw, _ = loader()
    for name, sd in raw.items():
        assert_same_rows(b[name], tokenize_split(sd, tok, 24, num_labels=2))
        # truncated rows: brute force without truncation
        full = tok([e.text_a for e in sd.examples], [e.text_b for e in sd.examples], truncation=False)["input_ids"]
        assert info_b.splits[name]["truncated"] == sum(len(x) > 24 for x in full) == b[name].truncated
        assert info_b.splits[name]["source"] == sd.source and info_b.splits[name]["skipped"] == sd.skipped
    assert info_b.splits["train"]["truncated"] > 0  # the check above is not vacuous
    # a changed dev file invalidates the whole entry (it is part of the key)
    f = data / "dev.tsv"
    f.write_text(f.read_text().replace("the", "teh", 1))
    _, info_c = tc.load_splits_cached(cfg, MRPC, tok, seed=0, cache_dir=cache, loader=loader, progress=False)
    assert not info_c.hit and calls == [1, 1, 1]
    # extra_key versions what the loader depends on beyond the files and config
    _, info_d = tc.load_splits_cached(cfg, MRPC, tok, seed=0, cache_dir=cache, loader=loader, progress=False, extra_key="v2")
    assert not info_d.hit and info_d.path != info_c.path
