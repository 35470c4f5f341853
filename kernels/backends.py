"""Names of the INT8 GEMM backends (no torch import: the recipe schema reads this list).

'auto' is resolved once, explicitly, by `ltp_compress.kernels.resolve_backend`; the others are
concrete backends (see kernels/linear_int8.py for what each runs)."""

BACKENDS = ("auto", "reference", "cpu_vnni", "cpu_avx2", "cpu_int_mm", "cuda")
