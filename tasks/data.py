"""Data layer: config, loading (hub / original GLUE TSV / csv / jsonl), tokenisation, batching.

Typical use::

    cfg = resolve_paths(DataConfig(source="glue_dir", path="data/sst2_demo"), recipe_dir)
    problems = check_data_files(cfg, task)          # fail before any compute starts
    train = load_split(cfg, task, "train", seed=0)
    ts = tokenize_split(train, tokenizer, cfg.max_seq_length)
    batches = length_bucketed_batches(ts, 32, shuffle=True, seed=0, pad_token_id=tokenizer.pad_token_id)

A tokenised split is always a :class:`TokenizedSplit` (flat token arrays); the token cache
(``tasks/token_cache.py``) stores and memory-maps the same arrays, so a cached and a fresh split
give the same batches. Batches are dynamically padded: each batch is padded to its own longest
example (never to ``max_seq_length``), and examples are grouped by length so little padding is needed.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ltp_compress.errors import UserError
from ltp_compress.sequence_length import DEFAULT_MAX_SEQ_LENGTH

from .glue import TaskSpec

__all__ = [
    "DataError",
    "DataConfig",
    "resolve_paths",
    "check_data_files",
    "split_file",
    "Example",
    "SplitData",
    "load_split",
    "TokenizedSplit",
    "tokenize_split",
    "Batch",
    "length_bucketed_batches",
    "mean_tokens",
]

# GLUE fields (MNLI parse trees) can be long; lift the csv module's 128 KiB field cap.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

_COLUMN_KEYS = ("text_a", "text_b", "label")


class DataError(UserError, ValueError):
    """A data file is missing or malformed. Messages start with ``path:line:`` where relevant."""


# ----------------------------------------------------------------------------- config
class DataConfig(BaseModel):
    """Where a task's data comes from and how it is cut.

    * ``source="hub"``: ``datasets.load_dataset("glue", task.name)`` (needs network or a
      populated HF cache).
    * ``source="glue_dir"``: ``path`` is a folder with the original GLUE TSV files
      (``train.tsv``, ``dev.tsv``; MNLI ``dev_matched.tsv``/``dev_mismatched.tsv``).
      ``train_file``/``dev_file`` may override individual files.
    * ``source="csv"`` / ``"jsonl"``: either ``path`` = folder holding ``train.<ext>`` and
      ``dev.<ext>`` (MNLI also ``dev_mismatched.<ext>``), or explicit ``train_file``/``dev_file``.
      ``columns`` maps ``text_a`` / ``text_b`` / ``label`` to the file's column (csv header
      name) or key (jsonl). CSV files ending in ``.tsv`` are read tab-separated. Labels may be
      integers, or label names of the task (e.g. ``"positive"``); regression labels are floats.

    ``max_train_examples`` / ``max_dev_examples`` take a seeded random subset (the ``seed``
    passed to :func:`load_split`; same seed -> same subset), kept in file order.
    ``validation_fraction`` / ``max_validation_examples`` size the validation split carved from
    the whole training file before ``max_train_examples`` subsamples what is left
    (:func:`ltp_compress.tasks.splits.load_train_and_validation`).
    Relative paths are resolved against the recipe folder by :func:`resolve_paths`.
    """

    model_config = ConfigDict(extra="forbid")

    source: Literal["hub", "glue_dir", "csv", "jsonl"] = "hub"
    path: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    columns: dict[str, str] | None = None
    max_seq_length: int = Field(DEFAULT_MAX_SEQ_LENGTH, ge=8, le=512)
    max_train_examples: int | None = Field(None, ge=1)
    max_dev_examples: int | None = Field(None, ge=1)
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of the training rows carved out as the "
                                       "validation split (leak-free, see tasks/splits.py); it makes every choice, dev is only evaluated")
    max_validation_examples: int | None = Field(1000, ge=1, description="cap on the validation split (on SST-2 every validation "
                                                "sentence also removes its ~9 phrases from train)")
    split_seed: int | None = Field(None, description="seed of the validation carving and of the row subsets (default: the "
                                   "recipe's seed). Pin it to the seed of the run that trained the recipe's model, so that a "
                                   "seed sweep starting from that model never validates on rows it trained on")
    train_shorter_than_quantile: float | None = Field(
        None, gt=0, le=1, description="train only on examples shorter than this quantile of the validation split's token counts "
        "(tokens as the model sees them: special tokens included, after truncation; numpy's linear quantile; rows with "
        "count < threshold are kept). 0.5: train on examples shorter than the validation median (the LTP paper's length-"
        "robustness protocol, Table III). Applied after the validation carving and max_train_examples; validation and dev "
        "are not filtered; the threshold and the train counts before / after are in data.json. None (default): off")
    on_bad_row: Literal["error", "skip"] = "error"
    cache: bool = Field(True, description="cache the tokenised splits (memory-mapped arrays, reused by reruns and sweeps; "
                                          "keyed by the data files' content, the tokenizer and these settings)")
    cache_dir: str | None = Field(None, description="token cache folder (default: <output_dir>/.token_cache)")

    def row_seed(self, recipe_seed: int) -> int:
        """The seed that carves validation and draws row subsets: split_seed, else the recipe's."""
        return recipe_seed if self.split_seed is None else self.split_seed

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "glue_dir" and not self.path:
            raise ValueError("data.path is required when data.source is 'glue_dir' "
                             "(a folder containing the original GLUE train.tsv / dev.tsv)")
        if self.source in ("csv", "jsonl"):
            cols = self.columns or {}
            missing = [k for k in ("text_a", "label") if not cols.get(k)]
            if missing:
                raise ValueError(
                    f"data.columns must map at least 'text_a' and 'label' for source "
                    f"'{self.source}' (missing: {', '.join(missing)}), e.g. "
                    "columns: {text_a: sentence, label: label}"
                )
            if not self.path and not (self.train_file or self.dev_file):
                raise ValueError(
                    f"source '{self.source}' needs data.path (folder with train.{self.source} "
                    f"and dev.{self.source}) or data.train_file / data.dev_file"
                )
        elif self.columns is not None:
            raise ValueError("data.columns is only used with source 'csv' or 'jsonl'")
        if self.source == "hub" and (self.path or self.train_file or self.dev_file):
            raise ValueError("data.path / train_file / dev_file are not used with source 'hub'; "
                             "use source 'glue_dir', 'csv' or 'jsonl' for local files")
        if self.columns is not None:
            bad = [k for k in self.columns if k not in _COLUMN_KEYS]
            if bad:
                raise ValueError(f"data.columns has unknown keys {bad}; allowed: {list(_COLUMN_KEYS)}")
        return self


def _resolve(p: str | None, base: Path) -> str | None:
    if p is None:
        return None
    q = Path(p).expanduser()
    if not q.is_absolute():
        q = Path(base) / q
    return str(q.resolve())


def resolve_paths(cfg: DataConfig, base_dir: Path | str) -> DataConfig:
    """Copy of ``cfg`` with relative ``path`` / ``train_file`` / ``dev_file`` made absolute
    against ``base_dir`` (the recipe's folder); ``~`` is expanded."""
    base = Path(base_dir)
    return cfg.model_copy(update={
        "path": _resolve(cfg.path, base),
        "train_file": _resolve(cfg.train_file, base),
        "dev_file": _resolve(cfg.dev_file, base),
        "cache_dir": _resolve(cfg.cache_dir, base),
    })


def split_file(cfg: DataConfig, task: TaskSpec, split: str) -> Path | None:
    """The file a local source reads for ``split`` (None for the hub source)."""
    task._check_split(split)
    if cfg.source == "hub":
        return None
    if split == "train" and cfg.train_file:
        return Path(cfg.train_file)
    if split == "dev" and cfg.dev_file:
        return Path(cfg.dev_file)
    if not cfg.path:
        # csv/jsonl with explicit files only: the other split has no file
        which = "train_file" if split == "train" else "dev_file"
        raise DataError(f"no file for split {split!r}: set data.{which} or data.path")
    if cfg.source == "glue_dir":
        return Path(cfg.path) / task.tsv_file(split)
    return Path(cfg.path) / f"{split}.{cfg.source}"


def check_data_files(cfg: DataConfig, task: TaskSpec) -> list[str]:
    """Human-readable problems (missing folders/files, column mapping vs task) WITHOUT loading,
    for every split of the task (train + dev sets). Returns [] when fine.
    The hub source is not checked (it needs the network at load time).
    """
    problems: list[str] = []
    if cfg.source == "hub":
        return problems
    if cfg.path and not Path(cfg.path).is_dir():
        problems.append(f"data folder not found: {cfg.path}")
    for s in task.split_keys:
        try:
            f = split_file(cfg, task, s)
        except DataError as e:
            problems.append(str(e))
            continue
        if f is not None and not f.is_file():
            problems.append(f"{task.report_name(s)} {s} file not found: {f}")
    if cfg.source in ("csv", "jsonl") and cfg.columns:
        if task.is_pair and not cfg.columns.get("text_b"):
            problems.append(f"task {task.name!r} is a sentence-pair task: data.columns needs 'text_b'")
        if not task.is_pair and cfg.columns.get("text_b"):
            problems.append(f"task {task.name!r} is a single-sentence task: remove 'text_b' from data.columns")
    return problems


# ----------------------------------------------------------------------------- loading
@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: int | float


@dataclass
class SplitData:
    name: str  # split key: train / dev / dev_mismatched
    examples: list[Example]
    skipped: int  # malformed rows skipped (on_bad_row="skip")
    source: str  # file path or hub id

    def __len__(self) -> int:
        return len(self.examples)


class _BadRow(Exception):
    pass


def _parse_label(raw: Any, task: TaskSpec, label_map: dict[str, int] | None) -> int | float:
    if raw is None:
        raise _BadRow("missing label")
    if task.is_regression:
        if isinstance(raw, bool):
            raise _BadRow(f"bad regression label {raw!r}")
        try:
            v = float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
        except ValueError:
            raise _BadRow(f"unparseable regression label {raw!r}") from None
        if not math.isfinite(v):
            raise _BadRow(f"non-finite label {raw!r}")
        return v
    if isinstance(raw, bool):
        raise _BadRow(f"bad label {raw!r}")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise _BadRow(f"non-integer class label {raw!r}")
        raw = int(raw)
    if isinstance(raw, int):
        v = raw
    else:
        s = str(raw).strip()
        if label_map is not None and s in label_map:
            v = label_map[s]
        else:
            try:
                v = int(s)
            except ValueError:
                valid = list(label_map) if label_map else list(range(task.num_labels))
                raise _BadRow(f"unknown label {s!r} (expected one of {valid})") from None
    if not 0 <= v < task.num_labels:
        raise _BadRow(f"label {v} out of range for {task.num_labels} classes")
    return v


def _text(raw: Any, what: str) -> str:
    if raw is None:
        raise _BadRow(f"missing {what}")
    if not isinstance(raw, str):
        raise _BadRow(f"{what} is not a string: {raw!r}")
    if not raw.strip():
        raise _BadRow(f"empty {what}")
    return raw


def _make_example(task: TaskSpec, a: Any, b: Any, label: Any,
                  label_map: dict[str, int] | None) -> Example:
    ta = _text(a, "text_a")
    tb = _text(b, "text_b") if task.is_pair else None
    return Example(ta, tb, _parse_label(label, task, label_map))


class _Collector:
    def __init__(self, cfg: DataConfig, path: str):
        self.cfg, self.path = cfg, path
        self.examples: list[Example] = []
        self.skipped = 0

    def bad(self, line_no: int | str | None, msg: str) -> None:
        where = self.path if line_no is None else f"{self.path}:{line_no}"
        if self.cfg.on_bad_row == "skip":
            self.skipped += 1
            return
        raise DataError(f"{where}: {msg} (set data.on_bad_row: skip to skip malformed rows)")


def _col_index(header: list[str], col: str | int, path: Path, what: str) -> int:
    if isinstance(col, int):
        return col
    if col not in header:
        raise DataError(f"{path}:1: column {col!r} ({what}) not in header {header}")
    return header.index(col)


def _read_glue_tsv(cfg: DataConfig, task: TaskSpec, path: Path) -> tuple[list[Example], int]:
    out = _Collector(cfg, str(path))
    label_map = task.label_map()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        n_fields = task.tsv_num_fields
        if task.tsv_header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (expected a header line)")
            header = [h.strip() for h in header]
            n_fields = len(header)
            ia = _col_index(header, task.tsv_text_a, path, "text_a")
            ib = _col_index(header, task.tsv_text_b, path, "text_b") if task.tsv_text_b is not None else None
            il = _col_index(header, task.tsv_label, path, "label")
        else:
            ia, il = int(task.tsv_text_a), int(task.tsv_label)
            ib = int(task.tsv_text_b) if task.tsv_text_b is not None else None
        prev_line = reader.line_num
        for row in reader:
            line_no = prev_line + 1  # first physical line of this record
            prev_line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if n_fields is not None and len(row) != n_fields:
                out.bad(line_no, f"expected {n_fields} tab-separated fields, got {len(row)}")
                continue
            try:
                ex = _make_example(task, row[ia], row[ib] if ib is not None else None, row[il], label_map)
            except (_BadRow, IndexError) as e:
                out.bad(line_no, str(e) or "missing field")
                continue
            out.examples.append(ex)
    return out.examples, out.skipped


def _label_map_for_user_files(task: TaskSpec) -> dict[str, int] | None:
    m = {n: i for i, n in enumerate(task.label_names)}
    if task.tsv_label_map:
        m.update(dict(task.tsv_label_map))
    return m or None


def _read_csv(cfg: DataConfig, task: TaskSpec, path: Path) -> tuple[list[Example], int]:
    cols = cfg.columns or {}
    out = _Collector(cfg, str(path))
    label_map = _label_map_for_user_files(task)
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delim)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected a header line)")
        header = [h.strip() for h in header]
        idx: dict[str, int | None] = {}
        for key in _COLUMN_KEYS:
            name = cols.get(key)
            if key == "text_b" and not task.is_pair:
                idx[key] = None
                continue
            if not name:
                raise DataError(f"{path}: data.columns has no {key!r} mapping (task {task.name} needs it)")
            idx[key] = _col_index(header, name, path, key)
        prev_line = reader.line_num
        for row in reader:
            line_no = prev_line + 1
            prev_line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                out.bad(line_no, f"expected {len(header)} fields, got {len(row)}")
                continue
            try:
                ex = _make_example(
                    task, row[idx["text_a"]],
                    row[idx["text_b"]] if idx["text_b"] is not None else None,
                    row[idx["label"]], label_map)
            except _BadRow as e:
                out.bad(line_no, str(e))
                continue
            out.examples.append(ex)
    return out.examples, out.skipped


def _read_jsonl(cfg: DataConfig, task: TaskSpec, path: Path) -> tuple[list[Example], int]:
    cols = cfg.columns or {}
    out = _Collector(cfg, str(path))
    label_map = _label_map_for_user_files(task)
    ka, kl = cols.get("text_a"), cols.get("label")
    kb = cols.get("text_b") if task.is_pair else None
    if task.is_pair and not kb:
        raise DataError(f"{path}: data.columns has no 'text_b' mapping (task {task.name} is a pair task)")
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                out.bad(line_no, f"invalid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                out.bad(line_no, "expected a JSON object per line")
                continue
            try:
                ex = _make_example(task, obj.get(ka), obj.get(kb) if kb else None, obj.get(kl), label_map)
            except _BadRow as e:
                out.bad(line_no, f"{e} (keys: {sorted(obj)})")
                continue
            out.examples.append(ex)
    return out.examples, out.skipped


def _read_hub(cfg: DataConfig, task: TaskSpec, split: str) -> tuple[list[Example], int, str]:
    hub_split = task.hub_split(split)
    source = f"hub:{task.hub_name}/{task.hub_config}[{hub_split}]"
    try:
        import datasets  # noqa: WPS433 (heavy import, only when needed)

        ds = datasets.load_dataset(task.hub_name, task.hub_config, split=hub_split)
    except Exception as e:  # offline, missing cache, hub errors
        raise DataError(
            f"could not load {source} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Download the original GLUE files and use data.source: glue_dir with "
            "data.path pointing at the task folder (or csv/jsonl), or set HF_DATASETS_OFFLINE=1 "
            "with a populated cache."
        ) from e
    out = _Collector(cfg, source)
    for i, row in enumerate(ds):
        try:
            ex = _make_example(task, row.get(task.text_a),
                               row.get(task.text_b) if task.text_b else None,
                               row.get("label"), None)
        except _BadRow as e:
            out.bad(f"row {i}", str(e))  # 0-based row index within the hub split
            continue
        out.examples.append(ex)
    return out.examples, out.skipped, source


def seeded_subset(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of n rows, in their original order (all rows when n is None or larger)."""
    if n is None or n >= len(examples):
        return examples
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(examples))[:n])
    return [examples[i] for i in keep]


def load_split(cfg: DataConfig, task: TaskSpec, split: str, seed: int = 0) -> SplitData:
    """Load one split (``"train"``, ``"dev"`` or, for MNLI, ``"dev_mismatched"``).

    Malformed rows raise :class:`DataError` (``"path:line: ..."``, 1-based physical line
    numbers, header = line 1) unless ``cfg.on_bad_row == "skip"``, in which case they are
    counted in ``SplitData.skipped``. ``max_train_examples`` / ``max_dev_examples`` keep a
    seeded random subset (in file order).
    """
    task._check_split(split)
    if cfg.source == "hub":
        examples, skipped, source = _read_hub(cfg, task, split)
    else:
        path = split_file(cfg, task, split)
        assert path is not None
        if not path.is_file():
            raise DataError(f"{task.report_name(split)} {split} file not found: {path}")
        source = str(path)
        reader = {"glue_dir": _read_glue_tsv, "csv": _read_csv, "jsonl": _read_jsonl}[cfg.source]
        examples, skipped = reader(cfg, task, path)
    if not examples:
        raise DataError(f"{source}: no usable examples for split {split!r}"
                        + (f" ({skipped} malformed rows skipped)" if skipped else ""))
    limit = cfg.max_train_examples if split == "train" else cfg.max_dev_examples
    examples = seeded_subset(examples, limit, seed)
    return SplitData(name=split, examples=examples, skipped=skipped, source=source)


# ----------------------------------------------------------------------------- tokenisation
class TokenizedSplit:
    """A tokenised split: the one representation every consumer uses (batching, evaluation, the
    token cache, which stores and memory-maps exactly these arrays).

    * ``ids``: int32, every row's token ids concatenated; ``offsets``: int64, ``len + 1`` entries,
      row i is ``ids[offsets[i]:offsets[i+1]]``; ``types``: int8 token type ids, laid out like ``ids``;
    * ``labels``: int64 classes, or float64 targets when ``num_labels == 1`` (regression);
    * ``truncated``: rows cut at ``max_seq_length`` (None when not counted).

    Far smaller than Python lists for big splits such as QQP's 364k pairs (measured in
    ``benchmarks/results/data_scale.md``)."""

    def __init__(self, name: str, ids: np.ndarray, offsets: np.ndarray, types: np.ndarray,
                 labels: np.ndarray, num_labels: int, truncated: int | None = None):
        if offsets.ndim != 1 or len(offsets) != len(labels) + 1:
            raise ValueError(f"offsets must have len(labels)+1 = {len(labels) + 1} entries, got {offsets.shape}")
        if ids.shape != types.shape:
            raise ValueError(f"ids {ids.shape} and token types {types.shape} differ in shape")
        self.name = name
        self.ids, self.offsets, self.types, self.labels = ids, offsets, types, labels
        self.num_labels = int(num_labels)
        self.truncated = truncated

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n]: tokens per row (special tokens included, no padding)."""
        return np.diff(self.offsets).astype(np.int64, copy=False)

    def batch(self, idx, pad_token_id: int) -> "Batch":
        """The :class:`Batch` of rows ``idx`` (in that order), right-padded with ``pad_token_id``
        to their longest row (attention mask 0 on padding), gathered in one vectorised step."""
        import torch

        idx = np.asarray(idx, dtype=np.int64)
        starts = np.asarray(self.offsets[idx])
        lengths = np.asarray(self.offsets[idx + 1]) - starts
        width = int(lengths.max()) if len(idx) else 0
        pos = np.arange(width, dtype=np.int64)
        mask = pos[None, :] < lengths[:, None]  # [b, width]
        flat = (starts[:, None] + pos[None, :])[mask]
        ids = np.full((len(idx), width), int(pad_token_id), dtype=np.int64)
        ids[mask] = self.ids[flat]
        tt = np.zeros((len(idx), width), dtype=np.int64)
        tt[mask] = self.types[flat]
        labels = np.asarray(self.labels[idx])
        return Batch(torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(tt),
                     torch.tensor(labels, dtype=torch.float32 if self.num_labels == 1 else torch.long),
                     torch.from_numpy(idx.copy()))

    def subset(self, rows, truncated: int | None = None) -> "TokenizedSplit":
        """A new split holding rows `rows` (indices, in that order), arrays copied into memory;
        `truncated` is the new split's count of truncated rows (the caller knows it; None: unknown)."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.asarray(self.offsets[rows], dtype=np.int64)
        lengths = np.asarray(self.offsets[rows + 1], dtype=np.int64) - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
        return TokenizedSplit(self.name, np.asarray(self.ids[flat]), offsets, np.asarray(self.types[flat]),
                              np.asarray(self.labels[rows]), self.num_labels, truncated=truncated)

    def __repr__(self) -> str:
        return (f"TokenizedSplit({self.name!r}, {len(self)} rows, {len(self.ids)} tokens, "
                f"num_labels={self.num_labels})")


def _encode_in_chunks(examples: list[Example], tokenizer, max_seq_length: int, chunk_size: int):
    """One batched tokenizer call per chunk of examples (truncation at max_seq_length, no padding):
    yields (input_ids, token_type_ids) per chunk, as the tokenizer returns them (sequences of
    ints); tokenizers without type ids (RoBERTa, DistilBERT) give all-zero type ids."""
    is_pair = bool(examples) and examples[0].text_b is not None
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        a = [e.text_a for e in chunk]
        b = [e.text_b if e.text_b is not None else "" for e in chunk] if is_pair else None
        enc = tokenizer(a, b, truncation=True, max_length=max_seq_length, padding=False,
                        return_token_type_ids=True, return_attention_mask=False)
        ids = enc["input_ids"]
        tt = enc.get("token_type_ids") if hasattr(enc, "get") else None
        yield ids, (tt if tt is not None else [[0] * len(x) for x in ids])


def tokenize_split(split: SplitData, tokenizer, max_seq_length: int, *, num_labels: int | None = None,
                   chunk_size: int = 8192, progress: bool = False) -> TokenizedSplit:
    """Tokenise with one batched call per chunk, ``tokenizer(a, b, truncation=True, max_length=...)``,
    straight into flat arrays (only one chunk's Python lists exist at a time; tqdm bar when
    ``progress``).

    No padding here (see :func:`length_bucketed_batches`). Tokenizers that return no
    ``token_type_ids`` (RoBERTa, DistilBERT) get all-zero type ids. ``num_labels`` defaults to 1
    when the labels are floats and to ``max(label)+1`` (at least 2) otherwise; pass
    ``task.num_labels`` to be explicit. Also counts the rows truncation cut (``.truncated``): only
    rows that came out exactly ``max_seq_length`` long can have been cut, and only those are
    tokenised again without truncation.
    """
    from tqdm.auto import tqdm

    ex = split.examples
    id_parts: list[np.ndarray] = []
    type_parts: list[np.ndarray] = []
    len_parts: list[np.ndarray] = []
    with tqdm(total=len(ex), desc=f"tokenise {split.name}", unit="ex", unit_scale=True,
              disable=not progress, mininterval=1.0) as bar:
        for ids, tt in _encode_in_chunks(ex, tokenizer, max_seq_length, chunk_size):
            lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            total = int(lens.sum())
            id_parts.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=total))
            t64 = np.fromiter(itertools.chain.from_iterable(tt), dtype=np.int64, count=total)
            if total and (t64.min() < 0 or t64.max() > 127):
                raise ValueError(f"token type ids out of int8 range in split {split.name!r}")
            type_parts.append(t64.astype(np.int8))
            len_parts.append(lens)
            bar.update(len(ids))
    ids64 = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
    if len(ids64) and (ids64.min() < 0 or ids64.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids out of int32 range in split {split.name!r}")
    ids32 = ids64.astype(np.int32)
    del ids64, id_parts
    types = np.concatenate(type_parts) if type_parts else np.zeros(0, dtype=np.int8)
    lengths = np.concatenate(len_parts) if len_parts else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    labels = [e.label for e in ex]
    if num_labels is None:
        if labels and isinstance(labels[0], float):
            num_labels = 1
        else:
            num_labels = max(2, (max(labels) + 1) if labels else 2)
    num_labels = int(num_labels)
    labels_array = np.asarray(labels, dtype=np.float64 if num_labels == 1 else np.int64)
    return TokenizedSplit(split.name, ids32, offsets, types, labels_array, num_labels,
                          truncated=_count_truncated(ex, lengths, tokenizer, max_seq_length))


def _count_truncated(ex: list[Example], lengths: np.ndarray, tokenizer, max_seq_length: int) -> int:
    is_pair = bool(ex) and ex[0].text_b is not None
    at_max = np.flatnonzero(lengths >= max_seq_length)
    cut = 0
    for s in range(0, len(at_max), 8192):
        rows = [ex[int(i)] for i in at_max[s:s + 8192]]
        enc = tokenizer([e.text_a for e in rows], [e.text_b or "" for e in rows] if is_pair else None,
                        truncation=False, padding=False, return_attention_mask=False, return_token_type_ids=False)
        cut += sum(1 for ids in enc["input_ids"] if len(ids) > max_seq_length)
    return cut


def mean_tokens(ts: TokenizedSplit) -> float:
    """Mean number of (unpadded) tokens per example, special tokens included."""
    return float(ts.lengths.mean()) if len(ts) else 0.0


# ----------------------------------------------------------------------------- batching
@dataclass
class Batch:
    input_ids: Any  # LongTensor [b, s]
    attention_mask: Any  # LongTensor [b, s]
    token_type_ids: Any  # LongTensor [b, s]
    labels: Any  # LongTensor [b] (classification) / FloatTensor [b] (regression)
    index: Any  # LongTensor [b]: row indices in the split

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy on `device` (this batch is not changed)."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in
                       (self.input_ids, self.attention_mask, self.token_type_ids, self.labels, self.index)))

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids}


#: training batches are length-sorted within chunks of this many batches (``length_bucketed_batches``)
CHUNK_BATCHES = 50


def length_bucketed_batches(ts: TokenizedSplit, batch_size: int, *, shuffle: bool, seed: int,
                            pad_token_id: int) -> list[Batch]:
    """Length-bucketed, dynamically padded batches covering every row exactly once.

    * ``shuffle=False`` (evaluation): rows sorted by length, longest first (so an
      out-of-memory shows up on the first batch); deterministic.
    * ``shuffle=True`` (training): seeded shuffle of the rows, then sort by length within chunks
      of ``CHUNK_BATCHES * batch_size`` rows, cut into batches, then shuffle the batch order.
      Same seed -> identical batches.

    Each batch is padded (right side, ``pad_token_id``; attention mask 0) to its own longest row.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(ts)
    if n == 0:
        return []
    lengths = ts.lengths
    groups: list[np.ndarray] = []
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        groups = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        chunk = CHUNK_BATCHES * batch_size
        for s in range(0, n, chunk):
            c = perm[s:s + chunk]
            c = c[np.argsort(-lengths[c], kind="stable")]
            groups.extend(c[t:t + batch_size] for t in range(0, len(c), batch_size))
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return [ts.batch(g, pad_token_id) for g in groups]
