"""`ltp-compress predict CHECKPOINT [TEXT ...] [--tsv FILE] [--task T] [--runtime R] [--threads N] [--streams K] [--backend B] [--batch-size N]`.

CHECKPOINT is a deployable checkpoint (torch runtime) or an ONNX export folder (onnxruntime).

Inputs, in this order of precedence:
  * positional texts; a sentence pair is written 'A ||| B';
  * --tsv FILE: tab-separated, column 1 = text_a, column 2 (if any) = text_b. The first line is a
    header and skipped when its first field (case-insensitive, stripped) is a known text column
    name: sentence, sentence1, text, text_a, question, question1, premise, #1 string. With such a
    header, column 2 is used as text_b only if its name is a known second-text column
    (sentence2, text_b, question2, hypothesis, #2 string) — so a GLUE dev file 'sentence<TAB>label'
    is read as single sentences. Without a header, any second column is text_b, except for a model
    known to classify single sentences: then a file whose lines have several columns and no known
    header is refused, naming the columns it expects;
  * neither: stdin, one text per line ('A ||| B' for pairs); empty lines are skipped.

The model's task (single sentences or pairs) comes from `model_task`: --task, else the run the
checkpoint (or the export's source checkpoint) belongs to. Inputs that cannot be classified as given
(empty text, a pair for a single-sentence model or the reverse, a line that is not valid UTF-8) are
reported on stderr with their line (stdin, --tsv) or position (arguments) and skipped; the others are
classified, and the exit status is 1. Truncated inputs are reported on stderr (tokens before truncation,
max_seq_length).

Output (stdout): one line per classified input, tab-separated: label, score, text (pairs as 'A ||| B').
score = probability of the predicted label (classification) or the predicted value (regression),
printed with 4 decimals. stderr: the runtime that ran, and for torch the INT8 backend and the
kernel calls that ran.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ltp_compress.errors import UserError

PAIR_SEP = "|||"
HEADER_A = {"sentence", "sentence1", "text", "text_a", "question", "question1", "premise", "#1 string"}
HEADER_B = {"sentence2", "text_b", "question2", "hypothesis", "#2 string"}


class InputFileError(UserError, ValueError):
    """A TSV file whose columns the model cannot use."""


@dataclass
class Inputs:
    """Texts read from one source: `pairs` to classify, `where[i]` names pairs[i] (e.g. 'stdin line 3'),
    `skipped`: messages for lines that could not be read (invalid UTF-8)."""

    pairs: list[tuple[str, str | None]]
    where: list[str]
    skipped: list[str]


def split_pair(text: str) -> tuple[str, str | None]:
    if PAIR_SEP in text:
        a, b = text.split(PAIR_SEP, 1)
        return a.strip(), b.strip()
    return text, None


def _decoded_lines(raw: bytes, source: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(1-based line number, text) for every line that is valid UTF-8 (a BOM is dropped), and one
    message per line that is not."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    good, bad = [], []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            good.append((n, line.decode("utf-8")))
        except UnicodeDecodeError as e:
            bad.append(f"{source} line {n}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); skipped")
    return good, bad


def read_tsv(path: Path, expects_pair: bool | None = None) -> list[tuple[str, str | None]]:
    return read_tsv_inputs(path, expects_pair).pairs


def read_tsv_inputs(path: Path, expects_pair: bool | None = None) -> Inputs:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: TSV file not found")
    lines, skipped = _decoded_lines(Path(path).read_bytes(), str(path))
    use_b = True
    if lines:
        head = [f.strip().lower() for f in lines[0][1].split("\t")]
        if head[0] in HEADER_A:
            use_b = len(head) > 1 and head[1] in HEADER_B
            if use_b and expects_pair is False:
                raise InputFileError(f"{path}: line 1: columns {head[0]!r}, {head[1]!r} are a sentence pair, but this model "
                                     f"classifies single sentences: give one text column (e.g. 'sentence')")
            lines = lines[1:]
        elif expects_pair is False and any(len(t.split("\t")) > 1 for _, t in lines):
            raise InputFileError(f"{path}: line 1: unknown columns {', '.join(repr(f) for f in head)}; this model classifies "
                                 f"single sentences: give one text column, or a header whose first column is one of "
                                 f"{', '.join(sorted(HEADER_A))} (further columns, e.g. 'label', are then ignored)")
    pairs, where = [], []
    for n, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        b = fields[1] if use_b and len(fields) > 1 and fields[1].strip() else None
        pairs.append((fields[0], b))
        where.append(f"{path} line {n}")
    return Inputs(pairs, where, skipped)


def collect_inputs(args, expects_pair: bool | None = None) -> Inputs:
    if args.inputs:
        return Inputs([split_pair(t) for t in args.inputs], [f"argument {i + 1}" for i in range(len(args.inputs))], [])
    if getattr(args, "tsv", None):
        return read_tsv_inputs(args.tsv, expects_pair)
    stdin = sys.stdin
    raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")  # a text stream (tests)
    lines, skipped = _decoded_lines(raw, "stdin")
    lines = [(n, t) for n, t in lines if t.strip()]
    return Inputs([split_pair(t) for _, t in lines], [f"stdin line {n}" for n, _ in lines], skipped)


def model_task(path: Path, task: str | None = None) -> tuple[str | None, bool | None]:
    """(task name, expects a sentence pair) of a checkpoint or export folder: `task` when given, else
    the run the checkpoint belongs to (an export: its source checkpoint's run); (None, None) when
    neither says."""
    from ltp_compress.pipeline.run_dir import RunDir
    from ltp_compress.tasks.glue import TASKS

    if task is None:
        path = Path(path)
        ckpt = path
        onnx_info = path / "ltp_onnx.json"
        if onnx_info.is_file():
            try:
                ckpt = Path(json.loads(onnx_info.read_text(encoding="utf-8")).get("source", {}).get("checkpoint", ""))
            except (ValueError, AttributeError):
                ckpt = path
        run = RunDir.containing_model(ckpt) if str(ckpt) else None
        if run is not None:
            try:
                task = run.recipe().get("task")
            except (UserError, ValueError, OSError):
                task = None
    if task is None:
        return None, None
    if task not in TASKS:
        raise InputFileError(f"task {task!r}: unknown (choose from {', '.join(TASKS)})")
    return task, TASKS[task].is_pair


def predict_pairs(model, pairs: list[tuple[str, str | None]], batch_size: int, details: bool = False) -> list[dict]:
    """Single texts and pairs may be mixed: each group is run separately, order is kept."""
    from ltp_compress.modeling.prediction import predict_texts

    results: list[dict | None] = [None] * len(pairs)
    singles = [i for i, (_, b) in enumerate(pairs) if b is None]
    doubles = [i for i, (_, b) in enumerate(pairs) if b is not None]
    if singles:
        for i, r in zip(singles, predict_texts(model, [pairs[i][0] for i in singles], None, batch_size, details)):
            results[i] = r
    if doubles:
        for i, r in zip(doubles, predict_texts(model, [pairs[i][0] for i in doubles], [pairs[i][1] for i in doubles], batch_size, details)):
            results[i] = r
    return results  # type: ignore[return-value]


def predict_cli(args) -> int:
    from ltp_compress.modeling.runtime_choice import load_model
    from ltp_compress.modeling.prediction import check_texts

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    _, expects_pair = model_task(args.checkpoint, getattr(args, "task", None))
    inputs = collect_inputs(args, expects_pair)  # unreadable files and columns fail before the model loads
    bad = set()
    problems = list(inputs.skipped)
    for i, (a, b) in enumerate(inputs.pairs):
        found = check_texts([(a, b)], expects_pair, lambda _: inputs.where[i])
        if found:
            bad.add(i)
            problems += [p + "; skipped" for p in found]
    for p in problems:
        print(f"ltp-compress: {p}", file=sys.stderr)
    keep = [i for i in range(len(inputs.pairs)) if i not in bad]
    pairs = [inputs.pairs[i] for i in keep]
    model = load_model(args.checkpoint, runtime=args.runtime, threads=args.threads, backend=args.backend, streams=args.streams)
    if model.runtime == "torch":
        from ltp_compress.kernels import kernel_counters, reset_kernel_counters

        reset_kernel_counters()
    results = predict_pairs(model, pairs, args.batch_size, details=True)
    for (a, b), r in zip(pairs, results):
        text = a if b is None else f"{a} {PAIR_SEP} {b}"
        print(f"{r['label']}\t{r['score']:.4f}\t{text}")
    sys.stdout.flush()
    for i, r in zip(keep, results):
        if r["truncation"] is not None:
            print(f"note: {inputs.where[i]}: {r['truncation']['tokens_before_truncation']} tokens, truncated to "
                  f"max_seq_length {r['truncation']['max_seq_length']}", file=sys.stderr)
    if model.runtime == "torch":
        kernels = ", ".join(f"{k} x{v}" for k, v in sorted(kernel_counters().items())) or "none (no inputs)"
        print(f"runtime: torch; int8 backend: {model.backend}; kernels run: {kernels}", file=sys.stderr)
    elif model.runtime == "fused":
        print(f"runtime: fused; {model.kernel_path()}", file=sys.stderr)
    else:
        print(f"runtime: {model.runtime}; {model.backend}", file=sys.stderr)
    print(f"runtime choice: {model.runtime_choice}", file=sys.stderr)
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    if problems:
        print(f"ltp-compress: {len(problems)} input(s) skipped, {len(pairs)} classified", file=sys.stderr)
        return 1
    return 0
