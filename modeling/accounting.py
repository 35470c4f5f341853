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


def layer_macs(n: np.ndarray | int, d: int, d_ff: int, n_out: np.ndarray | int | None = None) -> dict[str, np.ndarray]:
    """MACs of one encoder layer that n tokens enter and n_out tokens leave (n_out <= n; default n).

    Per layer (Vaswani et al. 2017; the accounting of Kim et al. KDD'22 §5 / Kaplan et al. 2020):
      qkv_proj     3 · n · d · d          (Q, K, V projections, [n, d] x [d, d] each)
      attn_scores  n · n · d              (Q Kᵀ summed over all heads: H · n · n · d/H)
      attn_context n · n · d              (A V, same shape; computed for every query row)
      out_proj     n_out · d · d          (attention output projection)
      ffn          2 · n_out · d · d_ff   (two FFN matmuls)

    Why n_out: a token's importance at layer l is read off layer l's attention probabilities, so
    the keep decision exists right after the softmax. A token pruned at layer l is, from then on,
    neither a key nor a value of any later layer and not read by the classifier, so its layer-l
    output projection and FFN rows are dead computation; the runtime (`forward_packed`) drops the
    row before them. The official LTP code makes the same split (its FLOPs bookkeeping records an
    "attn" length before and an "ffn" length after pruning, LTPSelfAttention). The dense model
    has n_out = n. We still count the A·V product for all n query rows, because that is what the
    runtime computes.
    Excluded: embeddings (lookups), softmax, LayerNorm, GELU, residual adds, biases, the pooler
    and classifier (O(d²) per example, independent of n), and score/threshold computation.
    FLOPs = 2 · MACs.
    """
    n = np.asarray(n, dtype=np.float64)
    n_out = n if n_out is None else np.asarray(n_out, dtype=np.float64)
    return {
        "qkv_proj": 3 * n * d * d,
        "attn_scores": n * n * d,
        "attn_context": n * n * d,
        "out_proj": n_out * d * d,
        "ffn": 2 * n_out * d * d_ff,
    }


def tokens_leaving_layers(tokens_per_layer: np.ndarray) -> np.ndarray:
    """Tokens that leave each layer's attention (= enter the next layer); the last layer prunes
    nothing, so its count is the one entering it. [N, L] -> [N, L]"""
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    return np.concatenate([tokens_per_layer[:, 1:], tokens_per_layer[:, -1:]], axis=1)


def _per_layer_ops(tokens_per_layer: np.ndarray, shape: "EncoderShape"):
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    leaving = tokens_leaving_layers(tokens_per_layer)
    for l in range(shape.num_layers):
        yield layer_macs(tokens_per_layer[:, l], shape.hidden, shape.intermediate, leaving[:, l])


def encoder_macs(tokens_per_layer: np.ndarray, shape: EncoderShape) -> np.ndarray:
    """Total MACs per example. tokens_per_layer: [N, L] tokens entering each layer -> [N].
    Layer l's output projection and FFN see the tokens entering layer l+1 (see layer_macs)."""
    total = np.zeros(np.shape(tokens_per_layer)[0])
    for ops in _per_layer_ops(tokens_per_layer, shape):
        total += sum(ops.values())
    return total


def encoder_flops(tokens_per_layer: np.ndarray, shape: EncoderShape) -> np.ndarray:
    """FLOPs per example = 2 · MACs (see layer_macs)."""
    return 2 * encoder_macs(tokens_per_layer, shape)


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


def encoder_bops(tokens_per_layer: np.ndarray, shape: EncoderShape, precision: Precision) -> np.ndarray:
    """BOPs per example = Σ_ops MACs(op) · b_w(op) · b_a(op)  (Kim et al. KDD'22 §5.3, following
    van Baalen et al. 2020 "Bayesian Bits"), with MACs from the token-aware count (layer_macs) —
    i.e. only the tokens actually present at each layer. [N, L] -> [N]"""
    total = np.zeros(np.shape(tokens_per_layer)[0])
    for ops in _per_layer_ops(tokens_per_layer, shape):
        for op, macs in ops.items():
            wb, ab = precision.bits[op]
            total += macs * wb * ab
    return total


def relative_flops(tokens_per_layer: np.ndarray, lengths: np.ndarray, shape: EncoderShape) -> float:
    """Σ FLOPs with the tokens actually present / Σ FLOPs of the same inputs unpruned (every layer
    sees all `lengths[i]` tokens): a ratio of sums over the examples. [N, L], [N] -> float"""
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    dense_tokens = np.repeat(np.asarray(lengths, dtype=np.float64)[:, None], shape.num_layers, axis=1)
    return float(encoder_flops(tokens_per_layer, shape).sum() / encoder_flops(dense_tokens, shape).sum())


def cost_summary(tokens_per_layer: np.ndarray, lengths: np.ndarray, shape: EncoderShape, precision: Precision) -> dict:
    """Dev-set cost report: mean GFLOPs/example, relative FLOPs vs the same model unpruned on the
    same inputs, kept tokens per layer, BOPs relative to FP16 and FP32 dense on the same inputs."""
    tokens_per_layer = np.asarray(tokens_per_layer, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.float64)
    dense_tokens = np.repeat(lengths[:, None], shape.num_layers, axis=1)
    flops = encoder_flops(tokens_per_layer, shape)
    dense_flops = encoder_flops(dense_tokens, shape)
    bops = encoder_bops(tokens_per_layer, shape, precision)
    bops_fp16 = encoder_bops(dense_tokens, shape, Precision.uniform(16, 16))
    bops_fp32 = encoder_bops(dense_tokens, shape, Precision.uniform(32, 32))
    keep_frac = tokens_per_layer / lengths[:, None]
    return {
        "gflops_per_example": float(flops.mean() / 1e9),
        "dense_gflops_per_example": float(dense_flops.mean() / 1e9),
        "relative_flops": relative_flops(tokens_per_layer, lengths, shape),
        "gbops_per_example": float(bops.mean() / 1e9),
        "relative_bops_vs_fp16_dense": float(bops.sum() / bops_fp16.sum()),
        "relative_bops_vs_fp32_dense": float(bops.sum() / bops_fp32.sum()),
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
