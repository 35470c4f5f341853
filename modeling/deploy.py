"""Deployable checkpoint: one folder holding a pruned INT8 classifier that runs without training code.

Layout (format version 1)::

    model.safetensors   int8 weights `<linear>.w_q` [N, K], per-channel scales `<linear>.w_scale` [N],
                        activation scales `<linear>.x_scale` [] (their one copy), biases `<linear>.bias` [N] (float32),
                        INT8 attention scales `<attention.self>.int8_matmuls.{q,k,v}_scale` [] (only
                        when quantization.attention_matmuls is "int8"), and every float part (embeddings, LayerNorms) under its Hugging Face name
    config.json         the Hugging Face model config (labels included)
    tokenizer files     as written by tokenizer.save_pretrained
    ltp.json            {"format": "ltp-compress-deployable", "format_version": 1,
                         "pruning": PruningConfig, "quantization": QuantInfo, "max_seq_length": int}
                        (typed: modeling/checkpoint_format.py CheckpointInfo, its one reader and writer;
                        quantization.activation_range: "full" [-128, 127] or "symmetric" [-127, 127],
                        the range of the quantised Linear inputs; absent: "symmetric", a checkpoint
                        written before the key existed; quantization.act_scales: older checkpoints
                        only, checked against the x_scale tensors)
    manifest.json       {"format_version": 1, "files": {name: {"size": bytes, "sha256": hex}}}

`load_deployable` verifies the manifest *first* (every listed file present, same size, same
sha256; no unlisted file among the ones it reads), never unpickles (safetensors + JSON only),
rebuilds the model skeleton from config.json (eager attention, random init, no download), swaps
in Int8Linear modules built from the stored int8 tensors, and loads everything strictly.

The manifest detects corruption and accidental edits (truncation, flipped bytes, missing or
extra files); it is not a signature: someone who edits a file and its manifest entry together is
not detected.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ltp_compress.console import install_known_message_filters
from ltp_compress.errors import CheckpointError
from ltp_compress.fileio import atomic_folder
from ltp_compress.manifest import MANIFEST_FILE, write_manifest  # noqa: F401 (MANIFEST_FILE re-exported)
from ltp_compress.modeling.prediction import predict_texts
from ltp_compress.modeling.checkpoint_format import (  # noqa: F401 (the format's names, re-exported)
    CONFIG_FILE, FORMAT, FORMAT_VERSION, LTP_FILE, REQUIRED_FILES, WEIGHTS_FILE, CheckpointInfo, QuantizationSection,
    activation_scales, read_checkpoint_info, verify_checkpoint, write_checkpoint_info,
)
from ltp_compress.sequence_length import DEFAULT_MAX_SEQ_LENGTH


# ----------------------------------------------------------------------------- save


def save_deployable(model: nn.Module, tokenizer, pruning, quant_info, folder: str | Path, *,
                    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH) -> Path:
    """Write the converted (Int8Linear) model as a deployable folder, atomically: everything goes
    to a temporary sibling folder, which is fsynced and renamed to `folder` (an existing `folder`
    is replaced only after the new one is complete)."""
    from safetensors.torch import save_file

    from ltp_compress.kernels import Int8Linear

    folder = Path(folder)
    qinfo = quant_info.to_dict() if hasattr(quant_info, "to_dict") else dict(quant_info)
    qinfo.pop("act_scales", None)  # stored once, as the x_scale tensors
    int8_names = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if not int8_names:
        raise ValueError("save_deployable expects a converted model (no Int8Linear modules found)")
    ltp = CheckpointInfo(format=FORMAT, format_version=FORMAT_VERSION,
                         pruning=pruning.to_dict() if hasattr(pruning, "to_dict") else dict(pruning),
                         quantization=QuantizationSection(**qinfo, int8_layers=int8_names), max_seq_length=int(max_seq_length),
                         model_type=model.config.model_type)
    with atomic_folder(folder, fmt=FORMAT) as tmp:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_checkpoint_info(tmp, ltp)
        write_manifest(tmp, FORMAT, FORMAT_VERSION)
    return folder


# ----------------------------------------------------------------------------- load


class DeployedModel:
    """A loaded deployable checkpoint: packed token-removing forward with INT8 GEMMs."""

    runtime = "torch"
    #: the last layer's rows this runtime runs past QKV (modeling/accounting.py LAST_LAYER_ROWS): every row
    last_layer_rows = "all"

    def __init__(self, model, tokenizer, pruning, ltp: CheckpointInfo, backend: str, path: Path, notes: list[str]):
        self.model = model
        self.tokenizer = tokenizer
        self.pruning = pruning
        self.ltp = ltp
        self.backend = backend
        self.path = path
        self.notes = notes  # e.g. weight re-quantisation for a 7-bit backend
        self.max_seq_length = ltp.max_seq_length
        self.last_kept_tokens: torch.Tensor | None = None  # [b, L] of the last logits() call
        cfg = model.config
        self.num_labels = cfg.num_labels
        self.id2label = {int(k): v for k, v in (cfg.id2label or {}).items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.buffers()).device

    def encode(self, texts_a: list[str], texts_b: list[str] | None = None) -> dict:
        enc = self.tokenizer(list(texts_a), None if texts_b is None else list(texts_b), truncation=True,
                             max_length=self.max_seq_length, padding=True, return_tensors="pt",
                             return_token_type_ids=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "token_type_ids": enc.get("token_type_ids")}

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        """Logits [b, num_labels] for a batch: a dict or object with input_ids, attention_mask
        (and token_type_ids) tensors [b, s]. Runs the packed token-removing INT8 forward."""
        from ltp_compress.modeling.pruned_encoder import forward_packed

        get = (lambda k: batch.get(k)) if isinstance(batch, dict) else (lambda k: getattr(batch, k, None))
        dev = self.device
        ids, mask, tt = get("input_ids"), get("attention_mask"), get("token_type_ids")
        if mask is None:
            mask = torch.ones_like(ids)
        out = forward_packed(self.model, ids.to(dev), mask.to(dev), None if tt is None else tt.to(dev),
                             self.pruning, return_kept=True)
        self.last_kept_tokens = out.kept_tokens.cpu()
        return out.logits.float().cpu()

    def logits_many(self, batches) -> list[torch.Tensor]:
        """Logits of each batch, in order, one batch at a time (the ONNX runtime's counterpart can
        run several at once); last_kept_tokens: every batch's rows, concatenated in order."""
        outs, kept = [], []
        for b in batches:
            outs.append(self.logits(b))
            kept.append(self.last_kept_tokens)
        if kept:
            self.last_kept_tokens = torch.cat(kept)
        return outs

    def predict(self, texts_a, texts_b=None, batch_size: int = 32) -> list[dict]:
        """[{"label": name, "score": probability of that label}] per input (regression:
        {"label": "score", "score": value}); see modeling.prediction.predict_texts."""
        return predict_texts(self, texts_a, texts_b, batch_size)


def load_deployable(path: str | Path, backend: str = "auto", device: str | torch.device | None = None) -> DeployedModel:
    """Verify, then load a deployable checkpoint. Needs torch, safetensors and transformers only.

    `backend`: INT8 GEMM backend ('auto' resolved once for `device`); `device` defaults to
    'cuda' for backend 'cuda' and to 'cpu' otherwise."""
    if device is None:
        device = "cuda" if backend == "cuda" else "cpu"
    from safetensors import safe_open

    install_known_message_filters()  # before transformers (which imports torchao when installed)
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ltp_compress.kernels import Int8Linear, quantize_per_channel_symmetric, resolve_backend, weight_qmax
    from ltp_compress.modeling.pruned_encoder import PruningConfig
    from ltp_compress.modeling.quantized import swap_linear

    path = Path(path)
    ltp = read_checkpoint_info(path)
    q = ltp.quantization
    int8_layers = q.int8_layers
    try:
        pruning = PruningConfig.from_dict(ltp.pruning)
    except TypeError as e:
        raise CheckpointError(f"{path / LTP_FILE}: invalid 'pruning' entry: {e}") from None
    try:
        concrete = resolve_backend(backend, device)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot run with INT8 backend {backend!r}: {e}") from None

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: cannot build the model config: {e}") from None
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    model.eval()

    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path / WEIGHTS_FILE}: unreadable safetensors file: {e}") from None

    notes = []
    qmax = weight_qmax(concrete)
    fused = set(q.fused_gelu)
    x_scales = activation_scales(q, tensors, path)
    for name in int8_layers:
        tensors.pop(f"{name}.x_scale")
        try:
            lin = model.get_submodule(name)
            w_q, w_scale = tensors.pop(f"{name}.w_q"), tensors.pop(f"{name}.w_scale")
        except (AttributeError, KeyError) as e:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: int8 layer '{name}' incomplete or unknown to the model ({e})") from None
        bias = tensors.pop(f"{name}.bias", None)
        if not isinstance(lin, nn.Linear) or tuple(w_q.shape) != (lin.out_features, lin.in_features) or w_q.dtype != torch.int8:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: '{name}.w_q' has shape {tuple(w_q.shape)} {w_q.dtype}, "
                                  f"the model expects int8 {(getattr(lin, 'out_features', '?'), getattr(lin, 'in_features', '?'))}")
        if w_q.numel() and int(w_q.abs().max()) > qmax:
            # backend accumulates exactly only 7-bit weights: re-quantise (lossy; noted)
            w_q, w_scale = quantize_per_channel_symmetric(w_q.float() * w_scale[:, None], qmax=qmax)
            if not notes:
                notes.append(f"weights re-quantised to [-{qmax}, {qmax}] for backend {concrete}")
        fuse = name in fused
        dev = torch.device(device)
        mod = Int8Linear(w_q.to(dev), w_scale.to(dev), None if bias is None else bias.to(dev), x_scales[name],
                         backend=concrete, fuse_gelu=fuse, act_qmin=q.act_qmin)
        swap_linear(model, name, mod, gelu_fused=fuse)
    if q.attention_matmuls == "int8":  # scales come from the safetensors buffers below; ltp.json names the layers
        from ltp_compress.modeling.quantized import attach_int8_attention

        try:
            attach_int8_attention(model, {name: {"q": 1.0, "k": 1.0, "v": 1.0} for name in q.attention_scales})
        except (AttributeError, TypeError) as e:
            raise CheckpointError(f"{path / LTP_FILE}: invalid 'quantization.attention_scales' ({e})") from None
    expected = set(model.state_dict().keys()) - {f"{n}.{b}" for n in int8_layers for b in ("w_q", "w_scale", "x_scale", "bias")}
    got = set(tensors)
    if expected - got or got - expected:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: tensors do not match the model built from {CONFIG_FILE} "
                              f"(missing: {sorted(expected - got)[:5]}, unexpected: {sorted(got - expected)[:5]})")
    model.load_state_dict(tensors, strict=False)
    model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer files: {e}") from None
    return DeployedModel(model, tokenizer, pruning, ltp, concrete, path, notes)
