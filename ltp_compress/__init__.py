"""ltp-compress: Learned Token Pruning, distillation and static INT8 for transformer classifiers.

Importing this package is cheap: torch, transformers, onnx and onnxruntime are imported only by
the functions that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, runtime: str = "auto", threads: int | None = None, backend: str = "auto", streams: int = 1):
    """Load a deployed (pruned, INT8) model folder for `predict` / `logits`.

    runtime:
        ``"torch"``: a deployable checkpoint (model.safetensors; see
        ltp_compress.modeling.deploy), run by the packed token-removing torch runtime (the
        reference) with INT8 GEMM backend `backend`.
        ``"onnxruntime"``: an ONNX export (model.onnx, written by ``ltp-compress export``; see
        ltp_compress.modeling.onnx_export), run by ONNX Runtime's CPU provider.
        ``"fused"``: a deployable checkpoint run by the fused C++ extension (one call per batch;
        ltp_compress.modeling.fused_runtime; needs `ltp_compress.kernels.fused_encoder.build()`,
        which scripts/setup_env.sh runs); `backend` is ignored.
        ``"auto"`` (default): the table in ltp_compress.modeling.runtime_choice (AUTO_TABLE):
        onnxruntime for a folder with model.onnx; fused for a deployable checkpoint on a CPU with
        AVX-512 VNNI when `backend` is 'auto', the extension builds and the checkpoint has nothing
        it refuses (else torch, with the reason on stderr); torch otherwise. Keyed on the folder and
        the CPU's flags, never on a timing.
    threads: threads in all (onnxruntime: the session's intra-op threads; torch:
        ``torch.set_num_threads``, which is process-wide). None leaves the runtime's default.
    streams: onnxruntime and fused: how many batches ``predict`` / ``logits_many`` run at once, each
        with threads // streams intra-op threads (the throughput setting; 1, the default, runs one
        batch at a time on all threads: the latency setting).
    backend: INT8 GEMM backend of the torch runtime ('auto' picks the best for this CPU).

    The returned object reports what ran: ``.runtime`` ("torch" / "onnxruntime" / "fused"),
    ``.backend`` and ``.runtime_choice`` (the table row, or "requested").
    Every folder's manifest is verified before anything in it is parsed.
    """
    from ltp_compress.modeling.runtime_choice import load_model

    return load_model(path, runtime=runtime, threads=threads, backend=backend, streams=streams)
