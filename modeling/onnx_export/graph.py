"""The ONNX graph builder's node and initializer helper (`_Graph`): unique node output names inside an
`If` branch's scope, initializers shared by both branches, deduplicated constants, and a few small
op conveniences. Knows nothing about encoders."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class _Graph:
    """Minimal ONNX graph builder: unique node output names, deduplicated scalar constants."""

    def __init__(self, opset: int):
        from onnx import helper

        self.helper = helper
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self._init_names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._n = 0
        self.scope = ""  # prefix of named outputs inside an `If` branch (names stay unique model-wide)

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self._init_names:
            raise ValueError(f"duplicate initializer {name}")
        self._init_names.add(name)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # (ascontiguousarray would make 0-d 1-d)
        return name

    def shared(self, name: str, make) -> str:
        """An initializer both `If` branches may ask for: created once from `make()`, then reused by name."""
        return name if name in self._init_names else self.init(name, make())

    def const(self, value, dtype) -> str:
        """A (cached) constant initializer: scalar or 1-D list."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const.{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None,
           domain: str = "", unused: Sequence[int] = (), **attrs) -> Any:
        """One node; returns its output name(s). Outputs at the indices in `unused` are left empty
        (the op does not compute them) and come back as None."""
        self._n += 1
        base = self.scope + (name or f"{op_type}_{self._n}")
        outs = ["" if i in unused else f"{base}:{i}" if n_out > 1 else base for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=f"n{self._n}.{base}", domain=domain, **attrs))
        outs = [o or None for o in outs]
        return outs if n_out > 1 else outs[0]

    # small conveniences (all shapes are noted at the call sites)
    def unsqueeze(self, x: str, axes: Sequence[int], name: str | None = None) -> str:
        return self.op("Unsqueeze", [x, self.const(list(axes), np.int64)], name=name)

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [x, self.const(list(axes), np.int64)])

    def reshape(self, x: str, shape: str | Sequence[int]) -> str:
        return self.op("Reshape", [x, shape if isinstance(shape, str) else self.const(list(shape), np.int64)])

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        return self.op("ReduceSum", [x, self.const(list(axes), np.int64)], keepdims=keepdims)

    def reduce_max(self, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        if self.opset >= 18:
            return self.op("ReduceMax", [x, self.const(list(axes), np.int64)], keepdims=keepdims)
        return self.op("ReduceMax", [x], axes=list(axes), keepdims=keepdims)
