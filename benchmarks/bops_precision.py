"""BOPs of a deployable INT8 checkpoint with its attention matmuls at other precisions (not a test).

Runs the checkpoint's own packed runtime on a dev set to get the tokens each example keeps per
layer, then counts BOPs with `modeling.accounting.encoder_bops` for attention matmuls (Q·Kᵀ, P·V)
at 32 (what the checkpoint runs), 16 and 8 bits, linears at 8x8 bits, and divides the BOPs of the
same inputs dense at FP16 by it, in both FLOPs conventions. A counting exercise: it says what INT8
attention would buy, it runs nothing at 8 bits. Writes <out-dir>/<name>.json and .md.

    python benchmarks/bops_precision.py runs/mrpc_minilm/stages/04-int8/model --data ../shared/data/glue/MRPC --task mrpc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+", help="deployable INT8 checkpoint folder(s)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="GLUE folder per checkpoint")
    p.add_argument("--task", nargs="+", required=True, help="task per checkpoint")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="bops_precision")
    args = p.parse_args(argv)
    from ltp_compress.pipeline.environment import environment_block, environment_summary, loadavg

    load0 = loadavg()

    import torch

    from ltp_compress.fileio import atomic_write_json, atomic_write_text
    from ltp_compress.manifest import sha256_file
    from ltp_compress.modeling.accounting import EncoderShape, Precision, encoder_bops
    from ltp_compress.modeling.deploy import load_deployable
    from ltp_compress.modeling.pruned_encoder import forward_packed
    from ltp_compress.tasks.data import DataConfig, length_bucketed_batches, load_split, tokenize_split
    from ltp_compress.tasks.glue import get_task

    torch.set_num_threads(1)
    rows = []
    for ck, data, task in zip(args.checkpoints, args.data, args.task):
        dm = load_deployable(ck)
        ts = tokenize_split(load_split(DataConfig(source="glue_dir", path=str(data)), get_task(task), "dev"), dm.tokenizer,
                            dm.max_seq_length)
        kept, lens = [], []
        for b in length_bucketed_batches(ts, 32, shuffle=False, seed=0, pad_token_id=dm.tokenizer.pad_token_id):
            out = forward_packed(dm.model, b.input_ids, b.attention_mask, b.token_type_ids, dm.pruning, return_kept=True)
            kept.append(out.kept_tokens.numpy())
            lens.append(b.attention_mask.sum(1).numpy())
        kept, lens = np.concatenate(kept), np.concatenate(lens)  # [N, L], [N]
        shape = EncoderShape.from_config(dm.model.config)
        dense = np.repeat(lens[:, None], shape.num_layers, 1)
        row = {"checkpoint": str(ck), "weights_sha256": sha256_file(ck / "model.safetensors"), "task": task,
               "examples": int(len(lens)), "reduction_vs_fp16_dense": {}}
        for conv in ("executed", "paper"):
            fp16 = float(encoder_bops(dense, shape, Precision.uniform(16, 16), conv).sum())
            row["reduction_vs_fp16_dense"][conv] = {
                str(bits): fp16 / float(encoder_bops(kept, shape, Precision.int8_linear_fp_attention(bits), conv).sum())
                for bits in (32, 16, 8)}
        rows.append(row)
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]), "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res["environment"] = environment_block(1, load0)
    atomic_write_json(args.out_dir / f"{args.name}.json", res)
    L = ["# BOPs reduction vs FP16 dense with the attention matmuls at other precisions", "", environment_summary(res["environment"]), "", f"command: `{res['command']}`", "",
         "Linears INT8 (8x8 bits) as deployed; attention matmuls (Q·Kᵀ, P·V) counted at 32 (as deployed), 16 or 8 bits; the "
         "tokens are what the checkpoint keeps on its dev set. Counting only: nothing runs at 8-bit attention.", "",
         "| task | checkpoint | convention | attention 32-bit (deployed) | 16-bit | 8-bit |", "|---|---|---|---|---|---|"]
    for r in rows:
        for conv, v in r["reduction_vs_fp16_dense"].items():
            L.append(f"| {r['task']} | `{r['checkpoint']}` | {conv} | {v['32']:.2f}x | {v['16']:.2f}x | {v['8']:.2f}x |")
    atomic_write_text(args.out_dir / f"{args.name}.md", "\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
