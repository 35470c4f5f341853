"""Expected third-party console messages, each filtered exactly (by logger and message pattern),
so that a run's console shows what matters. Nothing else is hidden: a message that does not
match a pattern below, or comes from another logger, is printed as usual.

The transformers load report for a freshly initialised classifier head is handled where models
are loaded (`modeling.model_io.load_classifier`), because only there is it known to be expected.
"""

from __future__ import annotations

import logging
import re

#: (logger, message pattern, why it is expected)
KNOWN_MESSAGES = (
    ("torchao", r"Failed to load \S*/torchao/_C_(mxfp8|cutlass_90a)\S*\.so: ",
     "transformers imports torchao when it is installed; these two torchao extensions are CUDA-only kernels "
     "(MXFP8, CUTLASS sm90a) built for another Python, and nothing in ltp-compress uses them"),
    ("torch.utils._pytree", r"<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass and is now natively "
                            r"supported by torch\.compile",
     "torchao 0.18 registers two of its enums with a pytree API that torch 2.13 deprecates"),
)


class _DropKnown(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install_known_message_filters() -> None:
    """Attach one exact filter per known message to its logger (idempotent)."""
    for logger_name, pattern, _ in KNOWN_MESSAGES:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropKnown) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropKnown(pattern))
