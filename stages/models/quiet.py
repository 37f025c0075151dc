"""Drop two library warnings that say nothing to our users (nothing else is filtered).

- transformers 5 warns once per image-processor class that "`XImageProcessor` requires
  torchvision (not installed); falling back to `XImageProcessorPil`" whenever any module
  imports the class, and diffusers imports several at import time (its IP-Adapter loader, some
  pipelines). torchvision is deliberately not a dependency (its PyPI wheel does not load beside
  the pinned CPU torch) and the PIL processors are the ones we want.
- diffusers' ``ModelMixin.to`` warns "There are modules in X that should be kept in float32: []"
  on every call with a dtype, even when that list is empty and the dtype unchanged — which its
  own IP-Adapter loader does (``self.to(dtype=self.dtype)``). Only the empty-list form is dropped.

Both otherwise repeat on every run and in every Ray actor's log.
"""

from __future__ import annotations

import logging

NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "diffusers.models.modeling_utils": "that should be kept in float32: [].",
}
"""Logger name → substring of the records dropped from it."""


class SubstringFilter(logging.Filter):
    """Rejects records whose message contains ``substring``."""

    def __init__(self, substring: str) -> None:
        super().__init__()
        self.substring = substring

    def filter(self, record: logging.LogRecord) -> bool:
        return self.substring not in record.getMessage()


def install() -> None:
    """Attach the filters to their loggers (idempotent)."""
    for name, substring in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, SubstringFilter) and f.substring == substring for f in logger.filters):
            logger.addFilter(SubstringFilter(substring))
