"""Deployable checkpoint: one folder holding a pruned INT8 classifier that runs without training code.

Layout (format version 1)::

    model.safetensors   int8 weights `<linear>.w_q` [N, K], per-channel scales `<linear>.w_scale` [N],
                        activation scales `<linear>.x_scale` [], biases `<linear>.bias` [N] (float32),
                        and every float part (embeddings, LayerNorms) under its Hugging Face name
    config.json         the Hugging Face model config (labels included)
    tokenizer files     as written by tokenizer.save_pretrained
    ltp.json            {"format": "ltp-compress-deployable", "format_version": 1,
                         "pruning": PruningConfig, "quantization": QuantInfo, "max_seq_length": int}
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

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ltp_compress.console import install_known_message_filters
from ltp_compress.errors import UserError

FORMAT = "ltp-compress-deployable"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LTP_FILE = "ltp.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, LTP_FILE)


class CheckpointError(UserError, ValueError):
    """A deployable checkpoint that is missing, incomplete, corrupted or of an unknown format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- save


def save_deployable(model: nn.Module, tokenizer, pruning, quant_info, folder: str | Path, *, max_seq_length: int = 128) -> Path:
    """Write the converted (Int8Linear) model as a deployable folder, atomically: everything goes
    to a temporary sibling folder, which is fsynced and renamed to `folder` (an existing `folder`
    is replaced only after the new one is complete)."""
    from safetensors.torch import save_file

    from ltp_compress.kernels import Int8Linear

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    qinfo = quant_info.to_dict() if hasattr(quant_info, "to_dict") else dict(quant_info)
    int8_names = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if not int8_names:
        raise ValueError("save_deployable expects a converted model (no Int8Linear modules found)")
    qinfo["int8_layers"] = int8_names
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        ltp = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "pruning": pruning.to_dict() if hasattr(pruning, "to_dict") else dict(pruning),
               "quantization": qinfo, "max_seq_length": int(max_seq_length),
               "model_type": model.config.model_type}
        (tmp / LTP_FILE).write_text(json.dumps(ltp, indent=2))
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                os.chmod(p, 0o644)  # readable by whoever serves the model
                rel = p.relative_to(tmp).as_posix()
                files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
        with open(tmp / MANIFEST_FILE, "w") as f:
            f.write(json.dumps(manifest, indent=2))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        _fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------- verify


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file against manifest.json; returns the manifest. Raises CheckpointError
    naming the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (a deployable checkpoint is a folder with {MANIFEST_FILE})")
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        hint = " (this looks like a training-stage model folder, not a deployable checkpoint: use the quantize stage's output)" if (path / "pruning.json").is_file() else ""
        raise CheckpointError(f"{mpath}: missing: not a deployable checkpoint{hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
        for name, entry in files.items():
            int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable or malformed manifest ({type(e).__name__}: {e})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: unsupported format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                              f"(this version reads {FORMAT!r} version {FORMAT_VERSION})")
    for req in REQUIRED_FILES:
        if req not in files:
            raise CheckpointError(f"{path / req}: not listed in {MANIFEST_FILE} (manifest edited or incomplete)")
    for name, entry in files.items():
        p = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{mpath}: invalid file name {name!r} in manifest")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST_FILE})")
        size = p.stat().st_size
        if size != int(entry["size"]):
            what = "truncated" if size < int(entry["size"]) else "larger than recorded"
            raise CheckpointError(f"{p}: {what}: {size} bytes, manifest says {entry['size']}")
        digest = _sha256(p)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{p}: content changed: sha256 {digest[:16]}... does not match the manifest ({str(entry['sha256'])[:16]}...)")
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE and p.name not in files:
            raise CheckpointError(f"{p}: not listed in {MANIFEST_FILE} (unexpected file, or manifest edited)")
    return manifest


# ----------------------------------------------------------------------------- load


class DeployedModel:
    """A loaded deployable checkpoint: packed token-removing forward with INT8 GEMMs."""

    def __init__(self, model, tokenizer, pruning, ltp: dict, backend: str, path: Path, notes: list[str]):
        self.model = model
        self.tokenizer = tokenizer
        self.pruning = pruning
        self.ltp = ltp
        self.backend = backend
        self.path = path
        self.notes = notes  # e.g. weight re-quantisation for a 7-bit backend
        self.max_seq_length = int(ltp.get("max_seq_length", 128))
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

    def predict(self, texts_a, texts_b=None, batch_size: int = 32) -> list[dict]:
        """[{"label": name, "score": probability of that label}] per input (regression:
        {"label": "score", "score": value}). Inputs are batched by length; order is kept."""
        texts_a = [texts_a] if isinstance(texts_a, str) else list(texts_a)
        if isinstance(texts_b, str):
            texts_b = [texts_b]
        if texts_b is not None and len(texts_b) != len(texts_a):
            raise ValueError(f"texts_b has {len(texts_b)} entries, texts_a {len(texts_a)}")
        if not texts_a:
            return []
        lens = [len(a) + (len(texts_b[i]) if texts_b is not None else 0) for i, a in enumerate(texts_a)]
        order = sorted(range(len(texts_a)), key=lambda i: -lens[i])
        results: list[dict | None] = [None] * len(texts_a)
        for s in range(0, len(order), max(1, batch_size)):
            idx = order[s:s + batch_size]
            enc = self.encode([texts_a[i] for i in idx], None if texts_b is None else [texts_b[i] for i in idx])
            lg = self.logits(enc)
            if self.num_labels == 1:
                for j, i in enumerate(idx):
                    results[i] = {"label": self.id2label.get(0, "score"), "score": float(lg[j, 0])}
            else:
                probs = lg.softmax(-1)
                p, c = probs.max(-1)
                for j, i in enumerate(idx):
                    results[i] = {"label": self.id2label.get(int(c[j]), str(int(c[j]))), "score": float(p[j])}
        return results  # type: ignore[return-value]


def read_deployable_info(path: str | Path) -> dict:
    """The checkpoint's ltp.json (pruning rule, quantisation info, max_seq_length), after verifying
    every file against the manifest: nothing is parsed before the bytes are known to be intact."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        ltp = json.loads((path / LTP_FILE).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path / LTP_FILE}: not valid JSON: {e}") from None
    if ltp.get("format") != FORMAT or ltp.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / LTP_FILE}: unsupported format {ltp.get('format')!r} version {ltp.get('format_version')!r}")
    return ltp


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
    ltp = read_deployable_info(path)
    q = ltp.get("quantization") or {}
    int8_layers = q.get("int8_layers")
    if not isinstance(int8_layers, list):
        raise CheckpointError(f"{path / LTP_FILE}: 'quantization.int8_layers' missing")
    try:
        pruning = PruningConfig.from_dict(ltp.get("pruning"))
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
    fused = set(q.get("fused_gelu") or [])
    for name in int8_layers:
        try:
            lin = model.get_submodule(name)
            w_q, w_scale = tensors.pop(f"{name}.w_q"), tensors.pop(f"{name}.w_scale")
            x_scale = tensors.pop(f"{name}.x_scale")
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
        mod = Int8Linear(w_q.to(dev), w_scale.to(dev), None if bias is None else bias.to(dev), float(x_scale),
                         backend=concrete, fuse_gelu=fuse)
        swap_linear(model, name, mod, gelu_fused=fuse)
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
