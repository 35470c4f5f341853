"""Names of the INT8 GEMM backends (no torch import: the recipe schema reads this list).

'auto' is resolved once, explicitly, by `ltp_compress.kernels.resolve_backend`; the others are
concrete backends (see kernels/linear_int8.py for what each runs)."""

BACKENDS = ("auto", "reference", "cpu_vnni", "cpu_avx2", "cpu_int_mm", "cuda")

#: the largest magnitude of a symmetric int8 value, [-127, 127]: weights, activation scales
#: (x_scale = a / QMAX) and the upper bound of every quantised activation. The one owner.
QMAX = 127

#: activation range name -> act_qmin, the lower bound of a quantised activation (the upper bound is
#: 127 either way; the scale is symmetric, x_scale = a / 127, zero-point 0). 'symmetric' [-127, 127]
#: is the first checkpoints' convention; 'full' [-128, 127] is the saturating range of ONNX
#: QuantizeLinear and of a uint8 source with zero-point 128, so an exported graph needs no clamp
#: before each quantisation (kernels/linear_int8.py). The one owner of this list.
ACTIVATION_RANGES = {"symmetric": -QMAX, "full": -QMAX - 1}
#: the range a checkpoint or finished stage recorded before the setting existed
LEGACY_ACTIVATION_RANGE = "symmetric"
