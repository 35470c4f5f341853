"""Fused runtime: a deployable checkpoint's whole pruned INT8 forward in one C++ call per batch.

`load_fused(path)` loads the checkpoint with the reference loader (modeling/deploy.py: manifest
verified, Int8Linear modules from the stored int8 tensors), then hands every tensor the forward
needs to the C++ extension (ltp_compress.kernels.fused_encoder; sources kernels/fused/), which
runs embeddings, every encoder layer (QKV as one [3d, d] integer GEMM when the three projections
share one activation scale, attention per sequence and head over the surviving tokens, token
scores, keep decision, gather, output projection, FFN with the GELU in the GEMM epilogue,
residual + LayerNorm) and the classifier head on packed rows. It computes what
modeling/pruned_encoder.py `forward_packed` computes (same quantisation grids, exact int32
accumulators, same keep rule); float parts (LayerNorm, softmax, GELU's erf approximation,
reduction orders) round differently in the last bits (tests/test_fused_runtime.py states the
tolerance).

Supported: BERT / RoBERTa sequence classifiers with absolute positions, every Linear INT8
(no fp_layers), FFN activation erf-GELU (fused or not) or ReLU, FP32 or INT8 attention matmuls,
pruning none / threshold / top-k, any batch of right-padded sequences. Anything else is refused
at load with the reason. The GEMM kernel (`kernel`: "avx512_vnni", "onednn_brgemm" or "reference")
is explicit, or, when not given, the row of modeling/runtime_choice.py FUSED_GEMM_TABLE for this
CPU's flags (onednn_brgemm on AMX CPUs, avx512_vnni on other AVX-512 VNNI CPUs); it is never chosen
by probing or timing and never falls back: a kernel that cannot run here is an error with the reason.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ltp_compress.errors import CheckpointError, SettingError
from ltp_compress.kernels import fused_encoder
from ltp_compress.modeling.deploy import DeployedModel, load_deployable
from ltp_compress.modeling.pruned_encoder import base_model, encoder_layers, num_heads

#: FFN activations the extension applies itself (config.hidden_act -> its name there)
_FFN_ACTS = {"gelu": "gelu", "relu": "relu"}


def _int8_weight(ext, module, kernel: str, what: str):
    from ltp_compress.kernels import Int8Linear

    if not isinstance(module, Int8Linear):
        raise CheckpointError(f"fused runtime: {what} is {type(module).__name__}, not an INT8 Linear (fp_layers are not supported)")
    return ext.Int8Weight(module.w_q, module.w_scale, module.bias, float(module.x_scale), module.act_qmin, bool(module.fuse_gelu), kernel)


def _qkv_weights(ext, sa, kernel: str, what: str) -> list:
    """One fused [3d, d] weight when query / key / value share the activation scale and range (they
    see the same input, so calibration gives them the same scale), else the three."""
    q, k, v = sa.query, sa.key, sa.value
    same = len({float(m.x_scale) for m in (q, k, v)}) == 1 and len({m.act_qmin for m in (q, k, v)}) == 1
    if not same or any(m.fuse_gelu for m in (q, k, v)):
        return [_int8_weight(ext, m, kernel, f"{what}.{n}") for m, n in ((q, "query"), (k, "key"), (v, "value"))]
    biases = [m.bias for m in (q, k, v)]
    bias = None if all(b is None for b in biases) else torch.cat([b if b is not None else torch.zeros(m.out_features)
                                                                  for b, m in zip(biases, (q, k, v))])
    return [ext.Int8Weight(torch.cat([q.w_q, k.w_q, v.w_q]), torch.cat([q.w_scale, k.w_scale, v.w_scale]), bias,
                           float(q.x_scale), q.act_qmin, False, kernel)]


def build_fused_encoder(model, pruning, kernel: str = "avx512_vnni"):
    """The extension's FusedEncoder holding `model`'s weights (a converted Int8Linear model, as
    `load_deployable` gives) and `pruning` (PruningConfig)."""
    reason = fused_encoder.gemm_kernel_unavailable_reason(kernel)
    if reason is not None:
        raise RuntimeError(f"fused runtime with GEMM kernel {kernel!r} is not available: {reason}")
    ext = fused_encoder.build()
    cfg = model.config
    if cfg.model_type not in ("bert", "roberta"):
        raise CheckpointError(f"fused runtime: model_type {cfg.model_type!r} not supported (bert, roberta)")
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise CheckpointError(f"fused runtime: position_embedding_type {cfg.position_embedding_type!r} not supported")
    act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else None
    if act not in _FFN_ACTS:
        raise CheckpointError(f"fused runtime: FFN activation {cfg.hidden_act!r} not supported ({sorted(_FFN_ACTS)})")
    emb = base_model(model).embeddings
    roberta = cfg.model_type == "roberta"
    enc = ext.FusedEncoder(emb.word_embeddings.weight.detach(), emb.position_embeddings.weight.detach(),
                           emb.token_type_embeddings.weight.detach(), emb.LayerNorm.weight.detach(), emb.LayerNorm.bias.detach(),
                           float(emb.LayerNorm.eps), roberta, int(cfg.pad_token_id if cfg.pad_token_id is not None else 0),
                           cfg.type_vocab_size > 1, num_heads(model))
    for i, layer in enumerate(encoder_layers(model)):
        what = f"encoder.layer.{i}"
        sa, so, inter, out = layer.attention.self, layer.attention.output, layer.intermediate, layer.output
        up = _int8_weight(ext, inter.dense, kernel, f"{what}.intermediate.dense")
        int8 = getattr(sa, "int8_matmuls", None)
        scaling = float(sa.scaling)
        if int8 is None:
            scales = (scaling, False, 1.0, 1.0, 1.0, 1.0)
        else:
            qs, ks, vs = (float(int8.q_scale), float(int8.k_scale), float(int8.v_scale))
            scales = (qs * ks * scaling, True, qs, ks, vs, vs / 255)
        enc.add_layer(_qkv_weights(ext, sa, kernel, f"{what}.attention.self"),
                      _int8_weight(ext, so.dense, kernel, f"{what}.attention.output.dense"),
                      so.LayerNorm.weight.detach(), so.LayerNorm.bias.detach(), float(so.LayerNorm.eps),
                      up, "none" if inter.dense.fuse_gelu else _FFN_ACTS[act],
                      _int8_weight(ext, out.dense, kernel, f"{what}.output.dense"),
                      out.LayerNorm.weight.detach(), out.LayerNorm.bias.detach(), float(out.LayerNorm.eps), *scales)
    if roberta:
        pre = _int8_weight(ext, model.classifier.dense, kernel, "classifier.dense")
        final = _int8_weight(ext, model.classifier.out_proj, kernel, "classifier.out_proj")
    else:
        pooler = base_model(model).pooler
        pre = None if pooler is None else _int8_weight(ext, pooler.dense, kernel, "pooler.dense")
        final = _int8_weight(ext, model.classifier, kernel, "classifier")
    enc.set_head(pre, final)
    enc.set_pruning(pruning.mode, list(pruning.thresholds or []), list(pruning.keep_ratios or []))
    return enc


class FusedDeployedModel(DeployedModel):
    """A deployable checkpoint run by the fused C++ runtime; the interface of DeployedModel
    (`logits`, `logits_many`, `predict`, `encode`, `last_kept_tokens`). `.backend` names the GEMM
    kernel ("fused:avx512_vnni"); `.model` stays the reference torch model it was built from."""

    runtime = "fused"
    #: the extension runs the last layer's attention for the [CLS] query only and its output projection and
    #: FFN on the [CLS] row only (modeling/accounting.py last_layer_macs)
    last_layer_rows = "cls"

    def __init__(self, deployed: DeployedModel, kernel: str | None = None, threads: int | None = None, streams: int = 1):
        kernel = default_gemm_kernel() if kernel is None else kernel
        super().__init__(deployed.model, deployed.tokenizer, deployed.pruning, deployed.ltp, f"fused:{kernel}",
                         deployed.path, deployed.notes)
        if int(streams) < 1:
            raise SettingError(f"streams must be >= 1, got {streams}")
        self.kernel = kernel
        self.threads = -1 if threads is None else int(threads)
        self.streams = int(streams)
        # each of `streams` concurrent batches gets threads // streams of the pool (the extension sets the
        # calling thread's OpenMP team size; forward releases the GIL)
        self.stream_threads = self.threads if self.streams == 1 or self.threads < 1 else max(1, self.threads // self.streams)
        self.encoder = build_fused_encoder(deployed.model, deployed.pruning, kernel)
        self._run_pass = None
        if self.streams > 1:
            from ltp_compress.modeling.onnx_runtime import concurrent_pass

            self._run_pass = concurrent_pass(lambda b: self._forward(b, self.stream_threads), self.streams)

    def kernel_path(self) -> str:
        """What runs the int8 GEMMs of this model, in the extension's words."""
        return fused_encoder.kernel_description(self.kernel)

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        """Logits [b, num_labels] of a batch (dict or object with input_ids, attention_mask and
        token_type_ids [b, s], right-padded): one call into the extension."""
        logits, kept = self._forward(batch, self.threads)
        self.last_kept_tokens = kept
        return logits

    def logits_many(self, batches) -> list[torch.Tensor]:
        """Logits of each batch, in order; with streams > 1 up to `streams` batches run at once, each
        on threads // streams threads. last_kept_tokens: every batch's rows, concatenated in order."""
        if self._run_pass is None:
            return super().logits_many(batches)
        outs = self._run_pass(list(batches))
        if outs:
            self.last_kept_tokens = torch.cat([k for _, k in outs])
        return [lg for lg, _ in outs]

    def _forward(self, batch, threads: int):
        get = (lambda k: batch.get(k)) if isinstance(batch, dict) else (lambda k: getattr(batch, k, None))
        ids, mask, tt = get("input_ids"), get("attention_mask"), get("token_type_ids")
        if mask is None:
            mask = torch.ones_like(ids)
        return self.encoder.forward(ids, mask, tt, threads)


def default_gemm_kernel() -> str:
    """The int8 GEMM kernel FUSED_GEMM_TABLE gives this CPU ("avx512_vnni" where no row matches: it then
    says itself why it cannot run)."""
    from ltp_compress.modeling.runtime_choice import fused_gemm_rule

    rule = fused_gemm_rule()
    return "avx512_vnni" if rule is None else rule.kernel


def load_fused(path: str | Path, kernel: str | None = None, threads: int | None = None, streams: int = 1) -> FusedDeployedModel:
    """Verify and load a deployable checkpoint for the fused runtime (`kernel`: its int8 GEMM kernel, None:
    FUSED_GEMM_TABLE's for this CPU; `threads`: threads in all; the
    extension sets the calling thread's intra-op team to it at each call when given; None keeps the
    process setting; `streams`: batches `logits_many` / `predict` run at once, each with
    threads // streams threads, as load_onnx's)."""
    return FusedDeployedModel(load_deployable(path, backend="reference"), kernel=kernel, threads=threads, streams=streams)
