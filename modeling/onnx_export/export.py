"""`export_onnx`: a deployable checkpoint (modeling/deploy.py) -> an export folder that plain
``onnxruntime`` runs without ltp_compress installed (its files and ltp_onnx.json:
modeling/export_format.py), written atomically, with the export-time parity check against the torch
runtime recorded in its manifest.json."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ltp_compress.fileio import atomic_folder, check_output_folder
from ltp_compress.json_model import load_json
from ltp_compress.manifest import write_manifest
from ltp_compress.modeling.checkpoint_format import LTP_FILE, WEIGHTS_FILE, parse_checkpoint_info, verify_checkpoint
from ltp_compress.modeling.export_format import (EXPORT_FORMAT, EXPORT_FORMAT_VERSION, HF_CONFIG_FILE, INPUT_NAMES, INT8_OPS,
                                                 NOT_COPIED_FROM_CHECKPOINT, ONNX_FILE, OUTPUT_NAMES, RECOMMENDED_SESSION_OPTIONS,
                                                 TOKENIZER_FILE, ExportError, ExportInfo, ExportQuantization, ExportSource,
                                                 session_options, write_export_info)
from ltp_compress.modeling.onnx_export.attention import resolve_attention_op
from ltp_compress.modeling.onnx_export.builder import DEFAULT_OPSET, SUPPORTED_OPSETS, build_onnx_model, num_labels
from ltp_compress.modeling.onnx_export.int8_linear import DEFAULT_INT8_OP

# sentences used for the export-time parity check when no texts are given
BUILTIN_PARITY_TEXTS = (
    "a gripping, beautifully acted film that stays with you long after the credits roll .",
    "the plot is thin and the jokes fall flat .",
    "it 's not a great movie , but it is a pleasant enough way to spend an afternoon .",
    "bad .",
    "an ambitious , often funny , sometimes moving portrait of a family in trouble , told with real affection for its characters and their small victories .",
    "i did not like it at all",
    "the director keeps things moving , and the cast is clearly having fun .",
    "a mess .",
    "what a wonderful surprise !",
    "slow , dull and far too long for what it has to say .",
    "the best thing about the film is its music , which is lovely .",
    "neither the story nor the acting is good enough to recommend .",
    "it works .",
    "charming and warm , though a little predictable in its second half .",
    "the movie never finds its footing and ends up as a series of loosely connected scenes that go nowhere in particular .",
    "funny .",
)


def _parity(checkpoint_dir: Path, onnx_path: Path, texts: Sequence[str], texts_b: Sequence[str] | None,
            batch_size: int) -> dict:
    """Run the torch runtime (load_deployable) and the ONNX graph on the same tokenised batches:
    argmax agreement, max |logit diff|, kept-token agreement per (example, layer)."""
    import onnxruntime as ort

    from ltp_compress.modeling.deploy import load_deployable

    dm = load_deployable(checkpoint_dir)
    sess = ort.InferenceSession(str(onnx_path), session_options(), providers=["CPUExecutionProvider"])
    agree = total = kept_eq = kept_total = 0
    max_diff = 0.0
    for s in range(0, len(texts), batch_size):
        enc = dm.encode(list(texts[s:s + batch_size]), None if texts_b is None else list(texts_b[s:s + batch_size]))
        ref = dm.logits(enc).numpy()
        ref_kept = dm.last_kept_tokens.numpy()
        feed = {k: (enc[k] if enc[k] is not None else enc["input_ids"] * 0).numpy().astype(np.int64) for k in INPUT_NAMES}
        logits, kept = sess.run(list(OUTPUT_NAMES), feed)
        max_diff = max(max_diff, float(np.abs(logits - ref).max()))
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
        kept_eq += int((kept == ref_kept).sum())
        kept_total += kept.size
    return {"examples": total, "batch_size": batch_size, "argmax_agreement": agree / max(total, 1),
            "max_abs_logit_diff": max_diff, "kept_tokens_agreement": kept_eq / max(kept_total, 1),
            "reference": f"torch runtime load_deployable(...).logits, INT8 backend {dm.backend}",
            "onnxruntime": ort.__version__}


def export_onnx(checkpoint_dir: str | Path, out_dir: str | Path, *, opset: int = DEFAULT_OPSET,
                parity_texts: Sequence[str] | None = None, parity_texts_b: Sequence[str] | None = None,
                parity_batch_size: int = 8, fuse_qkv: bool = True, int8_op: str = DEFAULT_INT8_OP,
                attention_op: str | None = None) -> Path:
    """Export a deployable checkpoint to a self-contained ONNX Runtime folder (atomically: built in
    a temporary sibling folder, renamed at the end). The parity check runs `parity_texts` (or
    BUILTIN_PARITY_TEXTS) through the torch runtime and the graph, in mixed-length batches of
    `parity_batch_size` (sentence pairs: `parity_texts_b`), and records the result in manifest.json
    under "parity". `int8_op`: see INT8_OPS; `fuse_qkv`: one GEMM for Q, K, V when they share their
    activation scale; `attention_op`: see ATTENTION_OPS and `resolve_attention_op`."""
    from safetensors.numpy import load_file

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if opset not in SUPPORTED_OPSETS or int8_op not in INT8_OPS:
        raise ExportError(f"opset {opset} / int8_op {int8_op!r} not supported (opset {SUPPORTED_OPSETS.start}.."
                          f"{SUPPORTED_OPSETS.stop - 1}, int8_op one of {INT8_OPS})")
    resolve_attention_op(attention_op, opset, int8_attention=False)  # a bad name / opset fails before any work
    src_manifest = verify_checkpoint(checkpoint_dir)
    if out_dir.resolve() == checkpoint_dir.resolve() or checkpoint_dir.resolve() in out_dir.resolve().parents:
        raise ExportError(f"{out_dir}: the export folder must not be (inside) the checkpoint {checkpoint_dir}")
    check_output_folder(out_dir, fmt=EXPORT_FORMAT)  # a file, a checkpoint or someone else's folder: refused before any work
    ltp = parse_checkpoint_info(load_json(checkpoint_dir / LTP_FILE, ExportError), checkpoint_dir / LTP_FILE, ExportError)
    config = load_json(checkpoint_dir / HF_CONFIG_FILE, ExportError)
    tensors = load_file(str(checkpoint_dir / WEIGHTS_FILE))
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(checkpoint_dir))  # id2label with the library's defaults filled in
    try:
        model, gemms = build_onnx_model(tensors, config, ltp, opset=opset, fuse_qkv=fuse_qkv, int8_op=int8_op,
                                        attention_op=attention_op)
        attention_gemms, attention_op, gemms = gemms["attention"], gemms["attention_op"], gemms["linear"]
    except ExportError as e:  # messages start with the file name inside the checkpoint
        raise ExportError(f"{checkpoint_dir}/{e}") from None

    from tokenizers import Tokenizer

    tok_cfg = {}
    if (checkpoint_dir / "tokenizer_config.json").is_file():
        tok_cfg = load_json(checkpoint_dir / "tokenizer_config.json", ExportError)
    if not (checkpoint_dir / TOKENIZER_FILE).is_file():
        raise ExportError(f"{checkpoint_dir / TOKENIZER_FILE}: missing (the export needs a fast tokenizer file)")
    if parity_texts_b is not None and (not parity_texts or len(parity_texts_b) != len(parity_texts)):
        raise ExportError("parity_texts_b needs parity_texts of the same length")
    pad_token = tok_cfg.get("pad_token")
    pad_token = pad_token.get("content") if isinstance(pad_token, dict) else pad_token
    pad_id = Tokenizer.from_file(str(checkpoint_dir / TOKENIZER_FILE)).token_to_id(pad_token) if pad_token else None
    if pad_id is None:
        pad_id, pad_token = int(config.get("pad_token_id") or 0), pad_token or "[PAD]"
    q = ltp.quantization
    info = ExportInfo(
        format=EXPORT_FORMAT, format_version=EXPORT_FORMAT_VERSION, model_type=config["model_type"],
        num_labels=num_labels(tensors, config),
        id2label={str(k): v for k, v in hf_config.id2label.items()},  # as the torch runtime names them
        max_seq_length=ltp.max_seq_length, pad_token=pad_token, pad_token_id=int(pad_id),
        inputs=list(INPUT_NAMES), outputs=list(OUTPUT_NAMES), opset=opset,
        num_layers=int(config["num_hidden_layers"]), pruning=ltp.pruning or {"mode": "none"},
        pruning_rule="score_l(i) = 1/H * sum_h sum_{j real, present} A_h(j, i); keep iff score > thresholds[l] "
                        "(topk: the ceil(keep_ratios[l] * n0) best); position 0 always kept; the last layer prunes nothing; "
                     "pruned tokens skip layer l's output projection and FFN",
        quantization=ExportQuantization(
            int8_gemms=gemms, int8_layers=q.int8_layers, fused_gelu=q.fused_gelu, fp_layers=q.fp_layers, weight_qmax=q.weight_qmax,
            activation_range=q.activation_range, int8_op=int8_op,
            scheme="QuantizeLinear(u8, zp 128) + integer GEMM with int8 per-channel weights, checkpoint scales",
            attention_matmuls=q.attention_matmuls, int8_attention_gemms=attention_gemms,
            attention_scheme=("Q, K, V int8 (checkpoint scales, per-axis QuantizeLinear), probabilities uint8 at 1/255; "
                              "MatMulInteger (exact int32) for Q·Kᵀ and P·V") if attention_gemms else
                             "float32, one ONNX Attention op per layer (probabilities as its 4th output)"
                             if attention_op == "Attention" else "float32 MatMul"),
        attention_op=attention_op,
        session_options=RECOMMENDED_SESSION_OPTIONS,
        source=ExportSource(checkpoint=str(checkpoint_dir.resolve()), weights_sha256=src_manifest["files"][WEIGHTS_FILE]["sha256"]),
    )
    with atomic_folder(out_dir, fmt=EXPORT_FORMAT) as tmp:
        import onnx

        onnx.save_model(model, str(tmp / ONNX_FILE))
        for p in sorted(checkpoint_dir.iterdir()):
            if p.is_file() and p.name not in NOT_COPIED_FROM_CHECKPOINT:
                shutil.copyfile(p, tmp / p.name)
        write_export_info(tmp, info)
        texts = list(parity_texts) if parity_texts else list(BUILTIN_PARITY_TEXTS)
        parity = _parity(checkpoint_dir, tmp / ONNX_FILE, texts, parity_texts_b if parity_texts else None, parity_batch_size)
        parity["inputs"] = "given texts" if parity_texts else "built-in sentences (BUILTIN_PARITY_TEXTS)"
        write_manifest(tmp, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, {"parity": parity})
    return out_dir
