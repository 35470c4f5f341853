"""ltp-compress: Learned Token Pruning, distillation and static INT8 for transformer classifiers.

Importing this package is cheap: torch and transformers are imported only by the functions
that need them.
"""

__version__ = "0.1.0"


def load(path, backend: str = "auto"):
    """Load a deployable (pruned, INT8) checkpoint folder; see ltp_compress.modeling.deploy."""
    from ltp_compress.modeling.deploy import load_deployable

    return load_deployable(path, backend=backend)
