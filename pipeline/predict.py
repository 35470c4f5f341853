"""`ltp-compress predict CHECKPOINT [TEXT ...] [--tsv FILE] [--runtime R] [--threads N] [--streams K] [--backend B] [--batch-size N]`.

CHECKPOINT is a deployable checkpoint (torch runtime) or an ONNX export folder (onnxruntime).

Inputs, in this order of precedence:
  * positional texts; a sentence pair is written 'A ||| B';
  * --tsv FILE: tab-separated, column 1 = text_a, column 2 (if any) = text_b. The first line is a
    header and skipped when its first field (case-insensitive, stripped) is a known text column
    name: sentence, sentence1, text, text_a, question, question1, premise, #1 string. With such a
    header, column 2 is used as text_b only if its name is a known second-text column
    (sentence2, text_b, question2, hypothesis, #2 string) — so a GLUE dev file 'sentence<TAB>label'
    is read as single sentences. Without a header, any second column is text_b;
  * neither: stdin, one text per line ('A ||| B' for pairs); empty lines are skipped.

Output (stdout): one line per input, tab-separated: label, score, text (pairs as 'A ||| B').
score = probability of the predicted label (classification) or the predicted value (regression),
printed with 4 decimals. stderr: the runtime that ran, and for torch the INT8 backend and the
kernel calls that ran.
"""

from __future__ import annotations

import sys
from pathlib import Path

PAIR_SEP = "|||"
HEADER_A = {"sentence", "sentence1", "text", "text_a", "question", "question1", "premise", "#1 string"}
HEADER_B = {"sentence2", "text_b", "question2", "hypothesis", "#2 string"}


def split_pair(text: str) -> tuple[str, str | None]:
    if PAIR_SEP in text:
        a, b = text.split(PAIR_SEP, 1)
        return a.strip(), b.strip()
    return text, None


def read_tsv(path: Path) -> list[tuple[str, str | None]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: TSV file not found")
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    use_b = True
    if lines:
        head = [f.strip().lower() for f in lines[0].split("\t")]
        if head[0] in HEADER_A:
            use_b = len(head) > 1 and head[1] in HEADER_B
            lines = lines[1:]
    out = []
    for line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        b = fields[1] if use_b and len(fields) > 1 and fields[1].strip() else None
        out.append((fields[0], b))
    return out


def collect_inputs(args) -> list[tuple[str, str | None]]:
    if args.inputs:
        return [split_pair(t) for t in args.inputs]
    if getattr(args, "tsv", None):
        return read_tsv(args.tsv)
    return [split_pair(line.rstrip("\n")) for line in sys.stdin if line.strip()]


def predict_pairs(model, pairs: list[tuple[str, str | None]], batch_size: int) -> list[dict]:
    """Single texts and pairs may be mixed: each group is run separately, order is kept."""
    results: list[dict | None] = [None] * len(pairs)
    singles = [i for i, (_, b) in enumerate(pairs) if b is None]
    doubles = [i for i, (_, b) in enumerate(pairs) if b is not None]
    if singles:
        for i, r in zip(singles, model.predict([pairs[i][0] for i in singles], None, batch_size=batch_size)):
            results[i] = r
    if doubles:
        for i, r in zip(doubles, model.predict([pairs[i][0] for i in doubles], [pairs[i][1] for i in doubles], batch_size=batch_size)):
            results[i] = r
    return results  # type: ignore[return-value]


def predict_cli(args) -> int:
    from ltp_compress.modeling.onnx_runtime import load_model

    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    model = load_model(args.checkpoint, runtime=args.runtime, threads=args.threads, backend=args.backend, streams=args.streams)
    pairs = collect_inputs(args)
    if model.runtime == "torch":
        from ltp_compress.kernels import kernel_counters, reset_kernel_counters

        reset_kernel_counters()
    results = predict_pairs(model, pairs, args.batch_size)
    for (a, b), r in zip(pairs, results):
        text = a if b is None else f"{a} {PAIR_SEP} {b}"
        print(f"{r['label']}\t{r['score']:.4f}\t{text}")
    sys.stdout.flush()
    if model.runtime == "torch":
        kernels = ", ".join(f"{k} x{v}" for k, v in sorted(kernel_counters().items())) or "none (no inputs)"
        print(f"runtime: torch; int8 backend: {model.backend}; kernels run: {kernels}", file=sys.stderr)
    else:
        print(f"runtime: {model.runtime}; {model.backend}", file=sys.stderr)
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
