"""INT8 GEMM kernels and token packing for the pruned BERT runtime.

Importing this package imports torch but probes no hardware and picks no backend; call
:func:`resolve_backend` (or build :class:`Int8Linear` with a backend) to do that, once.
"""

from .int8_linear import (
    BACKENDS,
    Int8Linear,
    PackedInt8Weight,
    available_backends,
    backend_unavailable_reason,
    cpu_isa,
    int8_linear,
    int8_linear_reference,
    int8_matmul_int32,
    kernel_counters,
    pack_weight,
    quantize_per_channel_symmetric,
    quantize_per_tensor_symmetric,
    reset_kernel_counters,
    resolve_backend,
    weight_qmax,
)
from .token_pack import (
    gather_kept,
    gather_kept_reference,
    pack_tokens,
    pack_tokens_reference,
    unpack_tokens,
    unpack_tokens_reference,
)

__all__ = [
    "BACKENDS",
    "Int8Linear",
    "PackedInt8Weight",
    "available_backends",
    "backend_unavailable_reason",
    "cpu_isa",
    "int8_linear",
    "int8_linear_reference",
    "int8_matmul_int32",
    "kernel_counters",
    "pack_weight",
    "quantize_per_channel_symmetric",
    "quantize_per_tensor_symmetric",
    "reset_kernel_counters",
    "resolve_backend",
    "weight_qmax",
    "gather_kept",
    "gather_kept_reference",
    "pack_tokens",
    "pack_tokens_reference",
    "unpack_tokens",
    "unpack_tokens_reference",
]
