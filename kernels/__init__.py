"""INT8 GEMM kernels and token packing for the pruned BERT runtime.

Importing this package imports nothing heavy: `BACKENDS` is a plain tuple (the recipe schema
reads it), and the torch-based names below are loaded on first use. No hardware is probed and no
backend is picked at import; call :func:`resolve_backend` (or build :class:`Int8Linear` with a
backend) to do that, once.
"""

from __future__ import annotations

import importlib

from .backends import ACTIVATION_RANGES, BACKENDS, QMAX

# public name -> submodule that defines it (loaded on first attribute access)
_LAZY = {
    **{name: "linear_int8" for name in (
        "Int8Linear", "KERNEL_COUNTER", "PackedInt8Weight", "act_qmin_of", "available_backends", "backend_unavailable_reason", "cpu_isa", "int8_linear",
        "int8_linear_reference", "int8_matmul_int32", "kernel_counters", "onednn_qlinear_u8", "pack_weight",
        "quantize_per_channel_symmetric", "quantize_per_tensor_symmetric", "quantize_u8_zp128", "reset_kernel_counters",
        "resolve_backend", "weight_qmax",
    )},
    **{name: "attention_int8" for name in (
        "Int8AttentionMatmuls", "attention_matmuls_reference", "int8_attention_context", "int8_attention_scores",
    )},
    "PackedLayout": "token_pack",
}

__all__ = ["ACTIVATION_RANGES", "BACKENDS", "QMAX", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
