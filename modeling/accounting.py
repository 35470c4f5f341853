"""Cost accounting: token-aware MACs/FLOPs and BOPs of a (pruned, quantised) encoder.

Every formula lives in one function, with its derivation here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EncoderShape:
    num_layers: int  # L
    hidden: int  # d
    intermediate: int  # d_ff

    @classmethod
    def from_config(cls, config) -> "EncoderShape":
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size)


# op classes of one encoder layer, in the order of layer_macs' return value
OP_CLASSES = ("qkv_proj", "attn_scores", "attn_context", "out_proj", "ffn")

#: how the tokens a layer prunes are charged (see layer_macs)
CONVENTIONS = ("executed", "paper")

#: which rows of the last layer a runtime runs past its QKV projection (see last_layer_macs):
#: "all" (the torch and ONNX runtimes, and both conventions), "cls" (the fused runtime)
LAST_LAYER_ROWS = ("all", "cls")


def layer_macs(n: np.ndarray | int, d: int, d_ff: int, n_out: np.ndarray | int | None = None,
               convention: str = "executed") -> dict[str, np.ndarray]:
    """MACs of one encoder layer that n tokens enter and n_out tokens leave (n_out <= n; default n).

    Per layer (Vaswani et al. 2017; the accounting of Kim et al. KDD'22 §5 / Kaplan et al. 2020):
      qkv_proj     3 · n · d · d          (Q, K, V projections, [n, d] x [d, d] each)
      attn_scores  n · n · d              (Q Kᵀ summed over all heads: H · n · n · d/H)
      attn_context n · n · d              (A V, same shape; computed for every query row)
      out_proj     m · d · d              (attention output projection)
      ffn          2 · n_out · d · d_ff   (two FFN matmuls)

    with m depending on the convention:
      "executed": m = n_out. A token's importance at layer l is read off layer l's attention
          probabilities, so the keep decision exists right after the softmax; a token pruned at
          layer l is never a key or value again and not read by the classifier, so its layer-l
          output projection and FFN rows are dead computation, and our runtime
          (`forward_packed`) drops the row before them. This is what runs.
      "paper": m = n. The official LTP code's FLOPs bookkeeping (its trainer's `compute_macs`)
          charges Q, K, V *and* the output projection at the tokens entering the layer and only
          the FFN at the tokens kept ("attn" length before, "ffn" length after pruning). Numbers
          set beside the paper's must use this convention.
    The dense model has n_out = n, so both conventions agree on it. The A·V product is counted for
    all n query rows in both, because that is what both runtimes compute.
    Excluded: embeddings (lookups), softmax, LayerNorm, GELU, residual adds, biases, the pooler
    and classifier (O(d²) per example, independent of n), and score/threshold computation.
    FLOPs = 2 · MACs.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; choose from {CONVENTIONS}")
    n = np.asarray(n, dtype=np.float64)
    n_out = n if n_out is None else np.asarray(n_out, dtype=np.float64)
    m = n_out if convention == "executed" else n
    return {
        "qkv_proj": 3 * n * d * d,
        "attn_scores": n * n * d,
        "attn_context": n * n * d,
        "out_proj": m * d * d,
        "ffn": 2 * n_out * d * d_ff,
    }


def tokens_leaving_layers(tokens_per_layer: np.ndarray) -> np.ndarray:
    """Tokens that leave each layer's attention (= enter the next layer); the last layer prunes
    nothing, so its count is the one entering it. [N, L] -> [N, L]"""
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    return np.concatenate([tokens_per_layer[:, 1:], tokens_per_layer[:, -1:]], axis=1)


def last_layer_macs(n: np.ndarray | int, d: int, d_ff: int) -> dict[str, np.ndarray]:
    """MACs of the last layer as a runtime runs it when the classifier's [CLS] row is all it keeps
    (last_layer_rows "cls", the fused runtime): every op after attention is row-wise, so only the
    [CLS] row needs them, and only its attention row is needed:
      qkv_proj     3 · n · d · d   (keys and values of every token; the runtime projects Q for all rows too)
      attn_scores  n · d           (one query row)
      attn_context n · d
      out_proj     d · d           (one row)
      ffn          2 · d · d_ff
    The classifier's logits are the same as with every row computed; neither convention charges it
    this way (they describe the model, this describes what one runtime executes)."""
    n = np.asarray(n, dtype=np.float64)
    one = np.ones_like(n)
    return {"qkv_proj": 3 * n * d * d, "attn_scores": n * d, "attn_context": n * d, "out_proj": one * d * d,
            "ffn": 2 * one * d * d_ff}


def _per_layer_ops(tokens_per_layer: np.ndarray, shape: "EncoderShape", convention: str, last_layer_rows: str = "all"):
    if last_layer_rows not in LAST_LAYER_ROWS:
        raise ValueError(f"unknown last_layer_rows {last_layer_rows!r}; choose from {LAST_LAYER_ROWS}")
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    leaving = tokens_leaving_layers(tokens_per_layer)
    for l in range(shape.num_layers):
        if last_layer_rows == "cls" and l == shape.num_layers - 1:
            yield last_layer_macs(tokens_per_layer[:, l], shape.hidden, shape.intermediate)
        else:
            yield layer_macs(tokens_per_layer[:, l], shape.hidden, shape.intermediate, leaving[:, l], convention)


def encoder_macs(tokens_per_layer: np.ndarray, shape: EncoderShape, convention: str = "executed",
                 last_layer_rows: str = "all") -> np.ndarray:
    """Total MACs per example. tokens_per_layer: [N, L] tokens entering each layer -> [N].
    Layer l's tokens leaving are the tokens entering layer l+1 (see layer_macs); last_layer_rows
    "cls": the last layer as last_layer_macs counts it."""
    total = np.zeros(np.shape(tokens_per_layer)[0])
    for ops in _per_layer_ops(tokens_per_layer, shape, convention, last_layer_rows):
        total += sum(ops.values())
    return total


def encoder_flops(tokens_per_layer: np.ndarray, shape: EncoderShape, convention: str = "executed",
                  last_layer_rows: str = "all") -> np.ndarray:
    """FLOPs per example = 2 · MACs (see layer_macs)."""
    return 2 * encoder_macs(tokens_per_layer, shape, convention, last_layer_rows)


@dataclass(frozen=True)
class Precision:
    """Bits of the operands of each op class: (weight-side operand bits, activation bits).

    For the two attention matmuls both operands are activations (Q, K or A, V)."""

    bits: dict[str, tuple[int, int]]

    @classmethod
    def uniform(cls, w_bits: int, a_bits: int) -> "Precision":
        return cls({op: (w_bits, a_bits) for op in OP_CLASSES})

    @classmethod
    def int8_linear_fp_attention(cls, attn_bits: int = 32) -> "Precision":
        """Our INT8 model: all Linear layers W8A8; the two attention matmuls stay float."""
        return cls({
            "qkv_proj": (8, 8),
            "attn_scores": (attn_bits, attn_bits),
            "attn_context": (attn_bits, attn_bits),
            "out_proj": (8, 8),
            "ffn": (8, 8),
        })


def encoder_bops(tokens_per_layer: np.ndarray, shape: EncoderShape, precision: Precision, convention: str = "executed") -> np.ndarray:
    """BOPs per example = Σ_ops MACs(op) · b_w(op) · b_a(op)  (Kim et al. KDD'22 §5.3, following
    van Baalen et al. 2020 "Bayesian Bits"), with MACs from the token-aware count (layer_macs) —
    i.e. only the tokens actually present at each layer. [N, L] -> [N]"""
    total = np.zeros(np.shape(tokens_per_layer)[0])
    for ops in _per_layer_ops(tokens_per_layer, shape, convention):
        for op, macs in ops.items():
            wb, ab = precision.bits[op]
            total += macs * wb * ab
    return total


def _dense_tokens(lengths: np.ndarray, shape: EncoderShape) -> np.ndarray:
    """Every layer sees all lengths[i] tokens. [N] -> [N, L]"""
    return np.repeat(np.asarray(lengths, dtype=np.float64)[:, None], shape.num_layers, axis=1)


def relative_flops(tokens_per_layer: np.ndarray, lengths: np.ndarray, shape: EncoderShape, convention: str = "executed",
                   last_layer_rows: str = "all") -> float:
    """Σ FLOPs with the tokens actually present / Σ FLOPs of the same inputs unpruned (every layer
    sees all `lengths[i]` tokens): a ratio of sums over the examples. [N, L], [N] -> float.
    last_layer_rows "cls": both counts as a runtime that runs only the last layer's [CLS] row past
    its QKV projection executes them (last_layer_macs)."""
    dense = _dense_tokens(lengths, shape)
    return float(encoder_flops(tokens_per_layer, shape, convention, last_layer_rows).sum()
                 / encoder_flops(dense, shape, convention, last_layer_rows).sum())


def relative_flops_by_group(tokens_per_layer: np.ndarray, lengths: np.ndarray, shape: EncoderShape,
                            groups: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per group of examples (row indices into the split): `relative_flops` of its rows in both
    conventions, and `dense_flops_share` = its share of the whole split's unpruned FLOPs (the same in
    both conventions: unpruned, they agree). Because each relative FLOPs is a ratio of sums, groups that
    partition the split recombine exactly: split relative FLOPs = Σ_g dense_flops_share_g · relative_flops_g,
    per convention. An empty group: relative_flops None, share 0."""
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.float64)
    dense = encoder_flops(_dense_tokens(lengths, shape), shape)
    out = {}
    for name, rows in groups.items():
        rows = np.asarray(rows, dtype=np.int64)
        rel = {c: (relative_flops(tokens_per_layer[rows], lengths[rows], shape, c) if len(rows) else None) for c in CONVENTIONS}
        out[name] = {"relative_flops": rel, "dense_flops_share": float(dense[rows].sum() / dense.sum())}
    return out


def cost_summary(tokens_per_layer: np.ndarray, lengths: np.ndarray, shape: EncoderShape, precision: Precision) -> dict:
    """Cost report of one evaluated split: the top-level FLOPs/BOPs keys use the "executed"
    convention (what runs); `by_convention` has them for both conventions. Relative FLOPs are vs the
    same model unpruned on the same inputs; BOPs relative to FP16 and FP32 dense on the same inputs.
    Also kept tokens per layer (mean, quantiles, a fixed sample of trajectories)."""
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.float64)
    dense = _dense_tokens(lengths, shape)
    by_convention = {}
    for convention in CONVENTIONS:
        flops = encoder_flops(tokens_per_layer, shape, convention)
        bops = encoder_bops(tokens_per_layer, shape, precision, convention)
        by_convention[convention] = {
            "gflops_per_example": float(flops.mean() / 1e9),
            "relative_flops": float(flops.sum() / encoder_flops(dense, shape, convention).sum()),
            "gbops_per_example": float(bops.mean() / 1e9),
            "relative_bops_vs_fp16_dense": float(bops.sum() / encoder_bops(dense, shape, Precision.uniform(16, 16), convention).sum()),
            "relative_bops_vs_fp32_dense": float(bops.sum() / encoder_bops(dense, shape, Precision.uniform(32, 32), convention).sum()),
        }
    keep_frac = tokens_per_layer / lengths[:, None]
    return {
        **by_convention["executed"],
        "dense_gflops_per_example": float(encoder_flops(dense, shape).mean() / 1e9),
        "by_convention": by_convention,
        "mean_tokens_per_layer": [float(v) for v in tokens_per_layer.mean(0)],
        "mean_keep_fraction_per_layer": [float(v) for v in keep_frac.mean(0)],
        "keep_fraction_quantiles_per_layer": {
            q: [float(v) for v in np.quantile(keep_frac, float(q), axis=0)] for q in ("0.1", "0.5", "0.9")
        },
        "mean_input_tokens": float(lengths.mean()),
        # tokens entering each layer for a fixed sample of examples (for trajectory plots)
        "sample_tokens_per_layer": tokens_per_layer[_sample_rows(len(lengths), 40)].astype(int).tolist(),
    }


def _sample_rows(n: int, k: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(n, size=min(n, k), replace=False))
