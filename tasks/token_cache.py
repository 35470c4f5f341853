"""Tokenisation cache for big splits (QQP: 364k pairs): flat numpy arrays on disk, memory-mapped.

Typical use (what the runner does: every split of a run in one entry)::

    def loader():                      # called only on a miss
        train, validation, carve = load_train_and_validation(cfg, task, seed)
        return {"train": train, "validation": validation, "dev": load_split(cfg, task, "dev", seed)}, {"carve": carve}

    splits, info = load_splits_cached(cfg, task, tokenizer, seed=seed, loader=loader,
                                      cache_dir=run_dir.parent / ".token_cache", log=log)
    splits["train"], info.hit, info.splits["dev"]["truncated"], info.extra["carve"]

On a hit the data files are hashed (to notice a changed file) but never parsed, and the arrays are
memory-mapped read-only, so a reload costs a sequential read of the files plus the cache and
almost no Python objects. On a miss the loader runs, each split is tokenised by
:func:`~ltp_compress.tasks.data.tokenize_split` behind a progress bar and the entry is written.
Either way the splits are :class:`~ltp_compress.tasks.data.TokenizedSplit` (this module stores
and maps its arrays; reading and tokenising live in ``tasks/data.py``).

**Cache key** (sha256 of a canonical JSON document, kept in ``header.json`` for inspection):

* the *content* of the data file: sha256 of its bytes plus its size. A content hash rather than
  path + mtime, because mtimes lie in both directions (``cp -p`` / ``rsync -t`` / unpacking an
  archive keep an mtime across a changed file; a ``touch`` or a fresh checkout changes it
  without changing a byte), and because hashing costs little next to tokenising.
  The path is *not* part of the key, so a moved or copied data folder still hits. The hub source
  has no file: there the key hashes the loaded examples' text and labels instead.
* the tokenizer's identity: sha256 of ``backend_tokenizer.to_str()`` (vocab, normaliser,
  pre-tokeniser, post-processor; its ``truncation`` / ``padding`` state is dropped because
  calling the tokenizer changes it) plus the Python-side settings that change the output
  (class, ``truncation_side``, special tokens), and the transformers / tokenizers versions.
  Slow (Python) tokenizers: the sorted vocabulary and their init kwargs instead.
* ``max_seq_length``, every ``DataConfig`` field except the file locations and cache settings
  (an extra field that changes nothing only costs a rebuild; a missing one would serve wrong
  rows), the task spec (columns, label map), the entry's label, the subset seed and ``num_labels``.
* a hash of the loader's source code (every ``tasks/*.py`` but this module and ``metrics.py``:
  reading, tokenising, validation carving, subsetting) and the cache format version, so a change in
  how rows are read, tokenised or selected can never serve stale rows; plus the caller's ``extra_key``.

**Format**: one folder per entry, ``<cache_dir>/<label>-<key[:20]>/`` holding, per split,
``<split>.ids.npy`` (int32, all token ids concatenated), ``<split>.offsets.npy`` (int64, n+1: row i
is ``ids[offsets[i]:offsets[i+1]]``), ``<split>.types.npy`` (int8 token type ids, same layout),
``<split>.labels.npy`` (int64 classes / float64 regression targets), and one ``header.json``
(key, key document, per split: rows, tokens, source, skipped and truncated rows, each file's
dtype, shape, size and sha256; the loader's ``extra``). No pickle anywhere
(``np.load(..., allow_pickle=False)``). The folder is written under a temporary name and renamed
into place when complete, so a crash never leaves a half entry, and processes racing on the same
entry (several ranks) each write their own and the first rename wins. A reload checks the header,
every file's size, dtype and shape, the sha256 of every file and the offsets' structure; any
mismatch logs a warning naming the file and rebuilds the entry. Entries are never deleted
automatically (a different key makes a new folder); delete the folder to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltp_compress.fileio import atomic_write_json, fsync_dir
from ltp_compress.manifest import sha256_file

from .data import DataConfig, DataError, SplitData, TokenizedSplit, split_file, tokenize_split
from .glue import TaskSpec

__all__ = [
    "CACHE_FORMAT",
    "CacheInfo",
    "CorruptCacheError",
    "file_fingerprint",
    "examples_fingerprint",
    "tokenizer_fingerprint",
    "load_splits_cached",
]

#: bump when the on-disk layout or the key document changes
CACHE_FORMAT = 1
_FILES = ("ids", "offsets", "types", "labels")
#: DataConfig fields that do not change a split's rows (locations are covered by the content hash)
#: (train_shorter_than_quantile filters the tokenised train split after the cache: the runner's load_task_data)
_NOT_ROW_FIELDS = frozenset({"path", "train_file", "dev_file", "split_seed",  # split_seed: enters the key as `seed`
                             "train_shorter_than_quantile"})

_log = logging.getLogger(__name__)


class CorruptCacheError(Exception):
    """A cache entry failed validation (internal: the entry is rebuilt, never used)."""


# ----------------------------------------------------------------------------- fingerprints
def file_fingerprint(path: Path | str) -> str:
    """``sha256:<hex of the bytes>:<size>`` of a data file (content, not path or mtime)."""
    path = Path(path)
    return f"sha256:{sha256_file(path)}:{path.stat().st_size}"


def examples_fingerprint(split: SplitData) -> str:
    """Hash of a loaded split's rows (text_a, text_b, label): for sources without a file (hub)."""
    h = hashlib.sha256()
    for e in split.examples:
        h.update(json.dumps([e.text_a, e.text_b, e.label], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return f"rows-sha256:{h.hexdigest()}:{len(split.examples)}"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output (see the module docstring)."""
    doc: dict[str, Any] = {"class": type(tokenizer).__name__}
    try:
        import tokenizers
        import transformers

        doc["versions"] = [transformers.__version__, tokenizers.__version__]
    except ImportError:  # pragma: no cover - both are dependencies
        doc["versions"] = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # changed by every call with truncation=True
        state.pop("padding", None)
        doc["backend"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode("utf-8")).hexdigest()
    else:  # slow tokenizer
        vocab = tokenizer.get_vocab()
        doc["vocab"] = hashlib.sha256(json.dumps(sorted(vocab.items())).encode("utf-8")).hexdigest()
        kw = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
              if "path" not in k and "file" not in k and "dir" not in k}
        doc["init_kwargs"] = json.loads(json.dumps(kw, sort_keys=True, default=str))
    for attr in ("truncation_side", "padding_side", "model_input_names"):
        doc[attr] = getattr(tokenizer, attr, None)
    specials = getattr(tokenizer, "special_tokens_map", None)
    doc["special_tokens"] = json.loads(json.dumps(specials, sort_keys=True, default=str)) if specials else None
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode("utf-8")).hexdigest()


#: tasks/ modules that cannot change which rows a split holds (the rest is hashed into the key)
_NOT_ROW_CODE = frozenset({"token_cache.py", "metrics.py", "__init__.py"})


def _code_fingerprint() -> str:
    """sha256 of the loader code (tasks/*.py but this module and metrics): reading, tokenising,
    carving and subsetting rows live there, so any change to them invalidates every entry."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256(f"format={CACHE_FORMAT}".encode())
    for f in sorted(here.glob("*.py")):
        if f.name not in _NOT_ROW_CODE:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _key(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- cache entries
@dataclass
class CacheInfo:
    """How a set of splits was obtained (for logs and reports)."""

    hit: bool  # True: served from the cache
    path: str | None  # cache entry folder (None: caching off)
    seconds: float  # wall time of the call
    rebuilt_reason: str | None = None  # set when a damaged entry was found and rebuilt
    # per split: {"source", "skipped", "truncated", "rows", "tokens"} as recorded when it was built
    splits: dict[str, dict] = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # what the loader reported (e.g. validation carving)

    def split(self, name: str) -> dict:
        return self.splits[name]


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"split name {name!r} must be letters, digits, '_' or '-'")
    return name


def _write_entry(entry: Path, splits: dict[str, TokenizedSplit], key: str, key_doc: dict,
                 split_meta: dict[str, dict], extra: dict) -> None:
    """Write into a temp folder next to `entry`, then rename it into place (first writer wins)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        doc = {}
        for name, ts in splits.items():
            files = {}
            arrays = {"ids": ts.ids, "offsets": ts.offsets, "types": ts.types, "labels": ts.labels}
            for part, arr in arrays.items():
                p = tmp / f"{_check_name(name)}.{part}.npy"
                with open(p, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
                files[part] = {"dtype": str(arr.dtype), "shape": list(arr.shape),
                               "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            doc[name] = {"rows": len(ts), "tokens": int(len(ts.ids)), "num_labels": ts.num_labels,
                         "files": files, "meta": {**split_meta.get(name, {}), "truncated": ts.truncated}}
        header = {"format": CACHE_FORMAT, "key": key, "splits": doc, "extra": extra, "key_doc": key_doc,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(tmp / "header.json", header)
        fsync_dir(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.exists():
                raise
            # another process finished the same entry first: keep theirs (validated on load)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        fsync_dir(entry.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_entry(entry: Path, key: str) -> tuple[dict[str, TokenizedSplit], dict]:
    """Load and fully validate an entry; raises CorruptCacheError naming the bad file."""
    hp = entry / "header.json"
    try:
        header = json.loads(hp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptCacheError(f"{hp}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCacheError(f"{hp}: unreadable ({e})") from None
    if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT or header.get("key") != key:
        raise CorruptCacheError(f"{hp}: format/key mismatch")
    splits_doc = header.get("splits")
    if not isinstance(splits_doc, dict) or not splits_doc:
        raise CorruptCacheError(f"{hp}: no splits listed")
    out = {}
    for name, sd in splits_doc.items():
        files = sd.get("files") if isinstance(sd, dict) else None
        if not isinstance(files, dict) or set(files) != set(_FILES):
            raise CorruptCacheError(f"{hp}: split {name!r} file list {sorted(files) if isinstance(files, dict) else files!r}")
        arrays = {}
        for part in _FILES:
            meta, p = files[part], entry / f"{_check_name(name)}.{part}.npy"
            try:
                size = p.stat().st_size
            except OSError:
                raise CorruptCacheError(f"{p}: missing") from None
            if size != meta.get("bytes"):
                raise CorruptCacheError(f"{p}: {size} bytes, header says {meta.get('bytes')} (truncated?)")
            if sha256_file(p) != meta.get("sha256"):
                raise CorruptCacheError(f"{p}: sha256 mismatch (file changed or damaged)")
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise CorruptCacheError(f"{p}: not a readable .npy ({e})") from None
            if str(arr.dtype) != meta.get("dtype") or list(arr.shape) != meta.get("shape") or arr.ndim != 1:
                raise CorruptCacheError(f"{p}: dtype/shape {arr.dtype}{arr.shape} != header {meta.get('dtype')}{meta.get('shape')}")
            arrays[part] = arr
        off, rows = arrays["offsets"], sd.get("rows")
        if (not isinstance(rows, int) or len(off) != rows + 1 or len(arrays["labels"]) != rows or int(off[0]) != 0
                or int(off[-1]) != len(arrays["ids"]) or len(arrays["types"]) != len(arrays["ids"])
                or (len(off) > 1 and bool((np.diff(off) < 0).any()))):
            raise CorruptCacheError(f"{entry}: split {name!r}: offsets/rows inconsistent")
        out[name] = TokenizedSplit(name, arrays["ids"], arrays["offsets"], arrays["types"], arrays["labels"],
                                   int(sd["num_labels"]), truncated=(sd.get("meta") or {}).get("truncated"))
    return out, header


def _remove_entry(entry: Path) -> None:
    trash = entry.parent / f".trash-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, trash)  # atomic: no reader sees a half-deleted entry
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _split_info(splits: dict[str, TokenizedSplit], meta: dict[str, dict]) -> dict[str, dict]:
    return {n: {**meta.get(n, {}), "rows": len(ts), "tokens": int(len(ts.ids)), "truncated": ts.truncated}
            for n, ts in splits.items()}


def _cached(cache_dir: Path | None, key_doc: dict, label: str, build, log: logging.Logger,
            ) -> tuple[dict[str, TokenizedSplit], CacheInfo]:
    """Serve `key_doc`'s entry from `cache_dir`, or ``build() -> (splits, split_meta, extra)`` and store it."""
    t0 = time.perf_counter()
    if cache_dir is None:
        splits, meta, extra = build()
        return splits, CacheInfo(False, None, time.perf_counter() - t0, None, _split_info(splits, meta), extra)
    key = _key(key_doc)
    entry = Path(cache_dir) / f"{_check_name(label)}-{key[:20]}"
    reason = None
    if entry.exists():
        try:
            splits, header = _read_entry(entry, key)
            meta = {n: d.get("meta") or {} for n, d in header["splits"].items()}
            log.info("token cache hit: %s (%s)", entry, ", ".join(f"{n} {len(t)} rows" for n, t in splits.items()))
            return splits, CacheInfo(True, str(entry), time.perf_counter() - t0, None, _split_info(splits, meta),
                                     header.get("extra") or {})
        except CorruptCacheError as e:
            reason = str(e)
            log.warning("token cache entry is corrupt, rebuilding it: %s", reason)
            _remove_entry(entry)
    else:
        log.info("token cache miss: %s; loading and tokenising", entry)
    tb = time.perf_counter()
    splits, meta, extra = build()
    meta = {n: {**meta.get(n, {}), "build_seconds": round(time.perf_counter() - tb, 3)} for n in splits}
    _write_entry(entry, splits, key, key_doc, meta, extra)
    try:
        splits, _ = _read_entry(entry, key)  # serve the memory-mapped copy (pages shared between ranks)
    except CorruptCacheError as e:  # pragma: no cover - only if the disk drops what was just written
        log.warning("token cache entry unreadable right after writing (%s); using the in-memory arrays", e)
    return splits, CacheInfo(False, str(entry), time.perf_counter() - t0, reason, _split_info(splits, meta), extra)


def _data_fields(cfg: DataConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_ROW_FIELDS and not k.startswith("cache")}


def _tokenize_all(raw: dict[str, SplitData], tokenizer, max_seq_length: int, num_labels: int | None,
                  chunk_size: int, progress: bool) -> tuple[dict[str, TokenizedSplit], dict[str, dict]]:
    splits, meta = {}, {}
    for name, sd in raw.items():
        ts = tokenize_split(sd, tokenizer, max_seq_length, num_labels=num_labels, chunk_size=chunk_size, progress=progress)
        ts.name = name
        splits[name] = ts
        meta[name] = {"source": sd.source, "skipped": int(sd.skipped)}
    return splits, meta


# ----------------------------------------------------------------------------- public entry points
def load_splits_cached(cfg: DataConfig, task: TaskSpec, tokenizer, *, seed: int, cache_dir: Path | str | None,
                       loader, label: str = "data", extra_key: Any = None, progress: bool = True,
                       log: logging.Logger | None = None, chunk_size: int = 8192,
                       ) -> tuple[dict[str, TokenizedSplit], CacheInfo]:
    """Every split a run needs, through one cache entry.

    ``loader()`` returns ``(splits, extra)``: ``splits`` maps a split name (``train``,
    ``validation``, ``dev``, ...) to its :class:`SplitData`; ``extra`` is a JSON-able dict stored
    with the entry and handed back on a hit (``info.extra``; e.g. how validation was carved). The
    loader must be a function of ``cfg``, ``task``, ``seed`` and the task's data files only (then
    the key below covers it); pass ``extra_key`` (any JSON-able value) to version anything else it
    depends on. It is not called on a hit: the data files (all of the task's splits) are hashed,
    never parsed. The hub source has no files, so there the loader always runs and its rows are hashed.

    Returns the tokenised splits (memory-mapped :class:`TokenizedSplit`; in memory when
    ``cache_dir`` is None) and a :class:`CacheInfo` with each split's source, skipped and
    truncated rows."""
    log = log or _log
    loaded: dict[str, Any] = {}

    def load():
        if "raw" not in loaded:
            raw, extra = loader()
            loaded["raw"], loaded["extra"] = dict(raw), dict(extra or {})
        return loaded["raw"], loaded["extra"]

    def build():
        raw, extra = load()
        splits, meta = _tokenize_all(raw, tokenizer, cfg.max_seq_length, task.num_labels, chunk_size, progress)
        return splits, meta, extra

    if cache_dir is None:
        return _cached(None, {}, label, build, log)
    files = {}
    if cfg.source != "hub":
        for s in task.split_keys:
            try:
                f = split_file(cfg, task, s)
            except DataError:  # csv/jsonl with only some files given: the loader decides what it needs
                f = None
            if f is not None and f.is_file():
                files[s] = file_fingerprint(f)
            else:
                files[s] = None  # the loader raises the usual DataError if it needs it
        if files.get("train") is None:
            load()  # raises DataError naming the missing file
    else:
        raw, _ = load()
        files = {n: examples_fingerprint(sd) for n, sd in raw.items()}
    key_doc = {"format": CACHE_FORMAT, "api": "splits", "label": label, "files": files,
               "tokenizer": tokenizer_fingerprint(tokenizer), "max_seq_length": int(cfg.max_seq_length),
               "data": _data_fields(cfg), "task": dataclasses.asdict(task), "seed": int(seed),
               "num_labels": int(task.num_labels), "code": _code_fingerprint(), "extra_key": extra_key}
    return _cached(Path(cache_dir), key_doc, label, build, log)
