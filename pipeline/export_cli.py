"""`ltp-compress export CKPT OUT [--format onnx] [--opset N] [--int8-op OP] [--attention-op OP] [--parity-tsv FILE]
[--parity-examples N]`: write a deployable checkpoint as a self-contained ONNX Runtime folder
(see ltp_compress.modeling.onnx_export, which owns the defaults and the supported values) and
print the export-time parity check.

Parity inputs: the first N rows of --parity-tsv (read like `ltp-compress predict --tsv`: pairs
when every row has a second text), else the built-in sentences.

Building the parser imports nothing heavy (`ltp-compress --help` stays fast)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMATS = ("onnx",)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a deployable checkpoint to a self-contained ONNX Runtime folder")
    p.add_argument("checkpoint", type=Path, help="deployable checkpoint folder (the quantize stage's output)")
    p.add_argument("out", type=Path, help="output folder: new, empty, or an earlier export (replaced atomically); a file, a checkpoint or a folder of other files is refused")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default and supported range: modeling/onnx_export/builder.py)")
    p.add_argument("--int8-op", default=None, metavar="OP",
                   help="MatMulIntegerToFloat (ORT contrib op, one kernel per INT8 linear; default) or "
                        "MatMulInteger (standard ONNX, portable)")
    p.add_argument("--attention-op", default=None, metavar="OP",
                   help="Attention (one standard ONNX op per layer, opset >= 23; the default there) or MatMul "
                        "(the spelled-out subgraph; the default below opset 23)")
    p.add_argument("--parity-tsv", type=Path, help="texts for the export-time parity check (default: built-in sentences)")
    p.add_argument("--parity-examples", type=int, default=64, help="how many rows of --parity-tsv to check (default 64)")
    return p


def export_cli(args) -> int:
    from ltp_compress.modeling.onnx_export import MANIFEST_FILE, ExportError, export_onnx

    if args.parity_examples < 1:
        raise ExportError("--parity-examples must be >= 1")
    texts_a = texts_b = None
    if args.parity_tsv is not None:
        from ltp_compress.pipeline.predict import read_tsv

        rows = read_tsv(args.parity_tsv)[: args.parity_examples]
        if not rows:
            raise ExportError(f"{args.parity_tsv}: no texts")
        texts_a = [a for a, _ in rows]
        texts_b = [b for _, b in rows] if all(b is not None for _, b in rows) else None
    options = {k: v for k, v in (("opset", args.opset), ("int8_op", args.int8_op), ("attention_op", args.attention_op)) if v is not None}
    out = export_onnx(args.checkpoint, args.out, parity_texts=texts_a, parity_texts_b=texts_b, **options)
    parity = json.loads((out / MANIFEST_FILE).read_text())["parity"]
    print(f"exported: {out}")
    print(f"parity vs torch runtime on {parity['examples']} examples ({parity['inputs']}): "
          f"argmax agreement {parity['argmax_agreement']:.4f}, max |logit diff| {parity['max_abs_logit_diff']:.3g}, "
          f"kept-token agreement {parity['kept_tokens_agreement']:.4f}")
    if parity["argmax_agreement"] < 1.0 or parity["kept_tokens_agreement"] < 1.0:
        print("note: disagreements come from float-order differences at threshold or decision ties; "
              "see manifest.json 'parity'", file=sys.stderr)
    return 0
