"""The checkpoint's tensors (numpy) and quantisation facts as the graph builder reads them, and the
records of the integer GEMM nodes it emits (for ltp_onnx.json)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ltp_compress.kernels.backends import QMAX
from ltp_compress.modeling.checkpoint_format import WEIGHTS_FILE
from ltp_compress.modeling.export_format import ExportError
from ltp_compress.modeling.onnx_export.graph import _Graph


@dataclass
class _Weights:
    """Checkpoint tensors (numpy) and quantisation facts."""

    tensors: dict[str, np.ndarray]
    int8_layers: set[str]
    fused_gelu: set[str]
    fp_layers: set[str]
    act_qmin: int = -QMAX  # lower bound of the quantised Linear inputs (kernels/backends.py ACTIVATION_RANGES)
    gemms: list[dict] = field(default_factory=list)  # one entry per int8 GEMM node, for ltp_onnx.json
    attention_gemms: list[str] = field(default_factory=list)  # the INT8 attention MatMulInteger nodes
    model_type: str = ""  # the HF config's model_type (named in the error for a missing tensor)

    def tensor(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name]
        except KeyError:
            raise ExportError(f"{WEIGHTS_FILE}: tensor '{name}' missing (expected for a {self.model_type} classifier)") from None

    def param(self, g: _Graph, name: str) -> str:
        """A float tensor of the checkpoint as an initializer of `g` under its own name."""
        return g.shared(name, lambda: self.tensor(name).astype(np.float32))
