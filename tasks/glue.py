"""GLUE task specifications.

Each :class:`TaskSpec` describes one GLUE task: where it lives on the Hugging Face hub, which
columns hold the texts and the label, how many labels it has (1 = regression, STS-B), which
metrics are reported and which one drives model selection, and the layout of the *original*
GLUE TSV files (as distributed by the GLUE benchmark ``download_glue_data.py``).

Split keys used throughout the pipeline are ``"train"``, ``"dev"`` and (MNLI only)
``"dev_mismatched"``. :meth:`TaskSpec.hub_split`, :meth:`TaskSpec.tsv_file` and
:meth:`TaskSpec.report_name` map a split key to the hub split name, the TSV file name and the
name used in reports (``mnli-m`` / ``mnli-mm`` for MNLI, the task name otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

__all__ = ["TaskSpec", "TASKS", "TASK_NAMES", "get_task", "SPLIT_KEYS"]

# A TSV column is addressed by header name (files with a header) or 0-based index (no header).
Column = Union[str, int]

SPLIT_KEYS = ("train", "dev", "dev_mismatched")


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a GLUE task.

    Attributes:
        name: lowercase task name (``sst2``, ``mnli`` ...); also the hub config name.
        hub_name: hub dataset id (``"glue"``); the config is ``hub_config`` (= ``name``).
        text_a / text_b: hub column names of the text(s); ``text_b`` is None for
            single-sentence tasks.
        num_labels: number of classes; 1 means regression (STS-B).
        label_names: class names in label-id order (hub order); empty for regression.
        metrics: metric names returned by :func:`ltp_compress.tasks.metrics.compute_metrics`.
        main_metric: the metric used for model selection (one of ``metrics``). For MNLI it is
            accuracy on the matched dev set (split key ``"dev"``).
        train_split: hub split name for training.
        dev_splits: hub split names of the dev sets, in the order of :attr:`dev_keys`.
        dev_report_names: names for reports, parallel to ``dev_splits``.
        tsv_train_file / tsv_dev_files: original GLUE file names (dev files parallel to
            ``dev_splits``).
        tsv_header: whether the TSV files start with a header line.
        tsv_text_a / tsv_text_b / tsv_label: TSV columns (header name, or 0-based index when
            there is no header).
        tsv_num_fields: expected number of fields per row for header-less files (files with a
            header must have as many fields as the header).
        tsv_label_map: for files whose labels are strings, ``((string, id), ...)``; None when
            labels are written as integers (classification) or floats (regression).
    """

    name: str
    hub_name: str
    text_a: str
    text_b: str | None
    num_labels: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    train_split: str = "train"
    dev_splits: tuple[str, ...] = ("validation",)
    dev_report_names: tuple[str, ...] = ()
    tsv_train_file: str = "train.tsv"
    tsv_dev_files: tuple[str, ...] = ("dev.tsv",)
    tsv_header: bool = True
    tsv_text_a: Column = "sentence"
    tsv_text_b: Column | None = None
    tsv_label: Column = "label"
    tsv_num_fields: int | None = None
    tsv_label_map: tuple[tuple[str, int], ...] | None = None

    # ------------------------------------------------------------------ derived helpers
    @property
    def hub_config(self) -> str:
        return self.name

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None

    @property
    def dev_keys(self) -> tuple[str, ...]:
        """Split keys of the dev sets: ``("dev",)`` or ``("dev", "dev_mismatched")`` for MNLI."""
        return ("dev", "dev_mismatched")[: len(self.dev_splits)]

    @property
    def split_keys(self) -> tuple[str, ...]:
        return ("train",) + self.dev_keys

    def _check_split(self, split: str) -> int:
        """Return -1 for train, else the index into the dev tuples."""
        if split == "train":
            return -1
        keys = self.dev_keys
        if split not in keys:
            raise ValueError(
                f"task {self.name!r} has no split {split!r}; valid splits: {', '.join(self.split_keys)}"
            )
        return keys.index(split)

    def hub_split(self, split: str) -> str:
        i = self._check_split(split)
        return self.train_split if i < 0 else self.dev_splits[i]

    def tsv_file(self, split: str) -> str:
        i = self._check_split(split)
        return self.tsv_train_file if i < 0 else self.tsv_dev_files[i]

    def report_name(self, split: str) -> str:
        i = self._check_split(split)
        if i < 0:
            return f"{self.name}-train"
        names = self.dev_report_names or (self.name,)
        return names[i]

    def label_map(self) -> dict[str, int] | None:
        return None if self.tsv_label_map is None else dict(self.tsv_label_map)


def _lm(*names: str) -> tuple[tuple[str, int], ...]:
    return tuple((n, i) for i, n in enumerate(names))


_ACC = ("accuracy",)
_F1_ACC = ("accuracy", "f1", "f1_acc")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            name="cola", hub_name="glue", text_a="sentence", text_b=None, num_labels=2,
            label_names=("unacceptable", "acceptable"), metrics=("mcc",), main_metric="mcc",
            # CoLA has NO header: source, label, original label (notes), sentence
            tsv_header=False, tsv_text_a=3, tsv_label=1, tsv_num_fields=4,
        ),
        TaskSpec(
            name="sst2", hub_name="glue", text_a="sentence", text_b=None, num_labels=2,
            label_names=("negative", "positive"), metrics=_ACC, main_metric="accuracy",
            tsv_text_a="sentence", tsv_label="label",
        ),
        TaskSpec(
            name="mrpc", hub_name="glue", text_a="sentence1", text_b="sentence2", num_labels=2,
            label_names=("not_equivalent", "equivalent"), metrics=_F1_ACC, main_metric="f1_acc",
            tsv_text_a="#1 String", tsv_text_b="#2 String", tsv_label="Quality",
        ),
        TaskSpec(
            name="qqp", hub_name="glue", text_a="question1", text_b="question2", num_labels=2,
            label_names=("not_duplicate", "duplicate"), metrics=_F1_ACC, main_metric="f1_acc",
            tsv_text_a="question1", tsv_text_b="question2", tsv_label="is_duplicate",
        ),
        TaskSpec(
            name="stsb", hub_name="glue", text_a="sentence1", text_b="sentence2", num_labels=1,
            label_names=(), metrics=("pearson", "spearman", "pearson_spearman"),
            main_metric="pearson_spearman",
            tsv_text_a="sentence1", tsv_text_b="sentence2", tsv_label="score",
        ),
        TaskSpec(
            name="mnli", hub_name="glue", text_a="premise", text_b="hypothesis", num_labels=3,
            label_names=("entailment", "neutral", "contradiction"), metrics=_ACC,
            main_metric="accuracy",
            dev_splits=("validation_matched", "validation_mismatched"),
            dev_report_names=("mnli-m", "mnli-mm"),
            tsv_dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
            # sentence1 = column 8, sentence2 = column 9 (0-based), gold_label = last column
            tsv_text_a="sentence1", tsv_text_b="sentence2", tsv_label="gold_label",
            tsv_label_map=_lm("entailment", "neutral", "contradiction"),
        ),
        TaskSpec(
            name="qnli", hub_name="glue", text_a="question", text_b="sentence", num_labels=2,
            label_names=("entailment", "not_entailment"), metrics=_ACC, main_metric="accuracy",
            tsv_text_a="question", tsv_text_b="sentence", tsv_label="label",
            tsv_label_map=_lm("entailment", "not_entailment"),
        ),
        TaskSpec(
            name="rte", hub_name="glue", text_a="sentence1", text_b="sentence2", num_labels=2,
            label_names=("entailment", "not_entailment"), metrics=_ACC, main_metric="accuracy",
            tsv_text_a="sentence1", tsv_text_b="sentence2", tsv_label="label",
            tsv_label_map=_lm("entailment", "not_entailment"),
        ),
        TaskSpec(
            name="wnli", hub_name="glue", text_a="sentence1", text_b="sentence2", num_labels=2,
            label_names=("not_entailment", "entailment"), metrics=_ACC, main_metric="accuracy",
            tsv_text_a="sentence1", tsv_text_b="sentence2", tsv_label="label",
        ),
    ]
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}


def get_task(name: str) -> TaskSpec:
    """Return the :class:`TaskSpec` for ``name`` (case-insensitive; ``SST-2``/``STS-B`` accepted)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return TASKS[key]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}"
        ) from None
