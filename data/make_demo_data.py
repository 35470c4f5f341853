"""Build the small demo / test data shipped in this folder from the original GLUE files.

Usage (from the repository root)::

    python data/make_demo_data.py ../shared/data/glue            # writes data/sst2_demo, data/mrpc_tiny

``GLUE_DIR`` must contain ``SST-2/{train,dev}.tsv`` and ``MRPC/{train,dev}.tsv`` as distributed
by GLUE. Rows are copied byte-for-byte (header included, MRPC's UTF-8 BOM dropped); samples
are drawn with ``numpy.random.default_rng(0)`` and kept in original file order.

* ``sst2_demo/train.tsv``: 4000 random rows of SST-2 train; ``sst2_demo/dev.tsv``: all 872 dev rows.
* ``mrpc_tiny/train.tsv``: 200 random rows of MRPC train; ``mrpc_tiny/dev.tsv``: 100 random dev rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SEED = 0


def _read_lines(path: Path) -> tuple[str, list[str]]:
    text = path.read_text(encoding="utf-8-sig")  # drops a leading BOM
    lines = text.splitlines(keepends=True)
    header, rows = lines[0], [ln for ln in lines[1:] if ln.strip()]
    return header, rows


def _write_sample(src: Path, dst: Path, n: int | None, rng: np.random.Generator) -> int:
    header, rows = _read_lines(src)
    if n is not None and n < len(rows):
        keep = np.sort(rng.choice(len(rows), size=n, replace=False))
        rows = [rows[i] for i in keep]
    dst.parent.mkdir(parents=True, exist_ok=True)
    rows = [r if r.endswith("\n") else r + "\n" for r in rows]
    with open(dst, "w", encoding="utf-8", newline="") as f:
        f.write(header if header.endswith("\n") else header + "\n")
        f.writelines(rows)
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("glue_dir", type=Path, help="folder holding SST-2/ and MRPC/ original GLUE TSVs")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="output folder (default: this data/ folder)")
    args = ap.parse_args(argv)

    jobs = [
        ("SST-2/train.tsv", "sst2_demo/train.tsv", 4000),
        ("SST-2/dev.tsv", "sst2_demo/dev.tsv", None),
        ("MRPC/train.tsv", "mrpc_tiny/train.tsv", 200),
        ("MRPC/dev.tsv", "mrpc_tiny/dev.tsv", 100),
    ]
    for src, dst, n in jobs:
        rng = np.random.default_rng(SEED)  # a fresh seed-0 generator per file
        count = _write_sample(args.glue_dir / src, args.out / dst, n, rng)
        print(f"{args.out / dst}: {count} rows (from {args.glue_dir / src})")


if __name__ == "__main__":
    main()
